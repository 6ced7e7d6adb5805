//! The runtime's configuration, read as the runtime reads it, and what it allows raylimit to
//! match: which files it loaded (`locate`), each file's text (`read`), the merged model
//! (`config`), the verdicts on inbounds, outbounds and the API (`verdict`), and a client for the
//! API's StatsService (`api`).

pub mod api;
pub mod config;
pub mod locate;
pub mod read;
pub mod verdict;

use config::{FileConfig, Merged};
use locate::{Located, Rooted};

/// A config file larger than this is not read; no real Xray config comes near it.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// What became of one config source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStatus {
    Read,
    Missing,
    Denied,
    /// Standard input or a URL: nothing raylimit can read back.
    NotOnDisk,
    Invalid(String),
}

impl FileStatus {
    pub fn name(&self) -> &'static str {
        match self {
            FileStatus::Read => "read",
            FileStatus::Missing => "missing",
            FileStatus::Denied => "permission_denied",
            FileStatus::NotOnDisk => "not_on_disk",
            FileStatus::Invalid(_) => "invalid",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FileStatus::Read => "read".into(),
            FileStatus::Missing => "missing".into(),
            FileStatus::Denied => "permission denied".into(),
            FileStatus::NotOnDisk => "not a file on disk (standard input or a URL)".into(),
            FileStatus::Invalid(why) => format!("not a valid config: {why}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// As the runtime sees it.
    pub path: String,
    pub status: FileStatus,
}

/// The runtime's config: its sources, what became of each, and the merge of those read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub located: Located,
    pub files: Vec<FileRead>,
    pub merged: Merged,
}

impl Loaded {
    /// The sources that could not be read; any of them may define or override a tag.
    pub fn unreadable(&self) -> Vec<&FileRead> {
        self.files
            .iter()
            .filter(|f| f.status != FileStatus::Read)
            .collect()
    }

    /// One line on why the config is incomplete, or `None` when every source was read.
    pub fn incomplete(&self) -> Option<String> {
        let bad = self.unreadable();
        if bad.is_empty() {
            return None;
        }
        let list: Vec<String> = bad
            .iter()
            .map(|f| format!("{} ({})", f.path, f.status.describe()))
            .collect();
        Some(format!(
            "the runtime's config could not be read in full: {}",
            list.join("; ")
        ))
    }
}

/// Reads and merges every located source through the process's root. `env` is the runtime's
/// environment, for `env:` ports.
pub fn load(located: Located, fs: &Rooted, env: &dyn Fn(&str) -> Option<String>) -> Loaded {
    let mut files = Vec::new();
    let mut parsed: Vec<FileConfig> = Vec::new();
    for path in &located.files {
        let status = match read_one(path, located.format.as_deref(), fs, env) {
            Ok(f) => {
                parsed.push(f);
                FileStatus::Read
            }
            Err(s) => s,
        };
        files.push(FileRead {
            path: path.clone(),
            status,
        });
    }
    Loaded {
        located,
        files,
        merged: config::merge(parsed),
    }
}

fn read_one(
    path: &str,
    format: Option<&str>,
    fs: &Rooted,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, FileStatus> {
    if !path.starts_with('/') {
        return Err(FileStatus::NotOnDisk);
    }
    let host = fs.host_path(path);
    let bytes =
        crate::files::read_bounded(&host, MAX_CONFIG_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FileStatus::Missing,
            std::io::ErrorKind::PermissionDenied => FileStatus::Denied,
            _ => FileStatus::Invalid(match e.kind() {
                // Named by the path the process sees, not the host's /proc/PID/root one.
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                    e.to_string().replace(&host.display().to_string(), path)
                }
                _ => e.to_string(),
            }),
        })?;
    let text =
        String::from_utf8(bytes).map_err(|_| FileStatus::Invalid("not UTF-8 text".into()))?;
    let value =
        read::parse(&text, read::Format::choose(format, path)).map_err(FileStatus::Invalid)?;
    config::from_value(&value, path, env).map_err(FileStatus::Invalid)
}
