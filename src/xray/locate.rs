//! Which config files a running Xray (or V2Ray) loaded, worked out the way its `run` command
//! does (`main/run.go`, `getConfigFilePath`): `-config`/`-c` files in order, then the files of
//! `-confdir` (or of `XRAY_LOCATION_CONFDIR`), else `config.*` in the working directory, else
//! `config.json` in `XRAY_LOCATION_CONFIG` or beside the executable, else standard input.
//!
//! Paths are as the process sees them; `Rooted` reads them through the process's root
//! (`/proc/<pid>/root`), which is right for containers, chroots and other mount namespaces.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// Xray and V2Ray resolve configs alike but read different environment variables, and V2Ray's
/// config directory holds only `.json` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Xray,
    V2ray,
}

impl Flavour {
    /// From the binary's name; anything not named v2ray is read as Xray.
    pub fn of_binary(name: &str) -> Flavour {
        if name.to_ascii_lowercase().contains("v2ray") || name.contains("v2fly") {
            Flavour::V2ray
        } else {
            Flavour::Xray
        }
    }

    fn env_name(self, what: &str) -> [String; 2] {
        let prefix = match self {
            Flavour::Xray => "xray",
            Flavour::V2ray => "v2ray",
        };
        let dotted = format!("{prefix}.location.{what}");
        let upper = dotted.to_ascii_uppercase().replace('.', "_");
        [dotted, upper]
    }

    fn extensions(self, format: Option<&str>) -> &'static [&'static str] {
        if self == Flavour::V2ray {
            return &[".json"];
        }
        match format.map(str::to_ascii_lowercase).as_deref() {
            Some("json") => &[".json", ".jsonc"],
            Some("toml") => &[".toml"],
            Some("yaml" | "yml") => &[".yaml", ".yml"],
            _ => &[".json", ".jsonc", ".toml", ".yaml", ".yml"],
        }
    }
}

/// A filesystem seen from a process's root directory.
#[derive(Debug, Clone)]
pub struct Rooted {
    pub root: PathBuf,
}

impl Rooted {
    pub fn of_pid(pid: u32) -> Rooted {
        Rooted {
            root: PathBuf::from(format!("/proc/{pid}/root")),
        }
    }

    /// The host path of a path the process sees.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn is_file(&self, path: &str) -> bool {
        fs::metadata(self.host_path(path)).is_ok_and(|m| m.is_file())
    }

    fn is_dir(&self, path: &str) -> bool {
        !path.is_empty() && fs::metadata(self.host_path(path)).is_ok_and(|m| m.is_dir())
    }

    /// File names in a directory, sorted as Go's `os.ReadDir` sorts them.
    fn list(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.host_path(dir))
            .map(|d| {
                d.filter_map(|e| {
                    let e = e.ok()?;
                    let is_dir = e.file_type().ok()?.is_dir();
                    (!is_dir).then(|| e.file_name().to_string_lossy().into_owned())
                })
                .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// What the runtime was started with, as far as config resolution cares.
pub struct Process<'a> {
    pub args: &'a [String],
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The working directory as the process sees it.
    pub cwd: Option<&'a str>,
    /// The executable as the process sees it.
    pub exe: &'a str,
    pub flavour: Flavour,
}

/// How the files were chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `-config`/`-c`, possibly followed by a config directory.
    Flags,
    /// A config directory alone, from `-confdir` or from the environment.
    Confdir { dir: String, from_env: bool },
    /// `config.*` in the working directory.
    WorkingDirectory,
    /// `config.json` in the location directory (environment, or beside the executable).
    Location { from_env: bool },
    /// Nothing on disk: the runtime read its config from standard input.
    Stdin,
}

impl Located {
    /// What identifies the config the runtime was started with: its config files and its
    /// config directory as a directory (`/etc/xray/conf/`), not the files in it, so that a file
    /// added to the directory does not make the runtime another owner.
    pub fn identity(&self) -> Vec<String> {
        let Some(dir) = &self.confdir else {
            return self.files.clone();
        };
        let dir = format!("{}/", dir.trim_end_matches('/'));
        let mut out: Vec<String> = self
            .files
            .iter()
            .filter(|f| !f.starts_with(&dir))
            .cloned()
            .collect();
        out.push(dir);
        out
    }
}

impl Origin {
    pub fn describe(&self) -> String {
        match self {
            Origin::Flags => "the -config/-c flags".into(),
            Origin::Confdir {
                dir,
                from_env: false,
            } => format!("the -confdir flag ({dir})"),
            Origin::Confdir {
                dir,
                from_env: true,
            } => {
                format!("the config directory named by the environment ({dir})")
            }
            Origin::WorkingDirectory => "the default config in the working directory".into(),
            Origin::Location { from_env: true } => {
                "config.json in the location named by the environment".into()
            }
            Origin::Location { from_env: false } => "config.json beside the executable".into(),
            Origin::Stdin => "standard input (no config file was found)".into(),
        }
    }
}

/// The resolved config sources, in the order the runtime merges them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub origin: Origin,
    /// Paths as the process sees them; `stdin:` and URLs are kept so they can be reported.
    pub files: Vec<String>,
    /// The config directory the files were listed from, when there was one.
    pub confdir: Option<String>,
    /// `-format`, when given.
    pub format: Option<String>,
}

/// Flags of the `run` command that take a value; everything else is a switch.
const VALUE_FLAGS: [&str; 4] = ["config", "c", "confdir", "format"];

/// Parses the command line with Go's `flag` rules: one or two dashes, `=` or a separate
/// value, and parsing stops at the first argument that is not a flag (or at `--`).
fn parse_flags(args: &[String]) -> (Vec<String>, Option<String>, Option<String>) {
    let mut configs = Vec::new();
    let mut confdir = None;
    let mut format = None;
    let mut i = 1;
    if args.get(1).map(String::as_str) == Some("run") {
        i = 2;
    }
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" || a == "-" || !a.starts_with('-') {
            break;
        }
        let body = a.strip_prefix("--").unwrap_or(&a[1..]);
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if VALUE_FLAGS.contains(&name) {
            let value = match inline {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    args.get(i).cloned()
                }
            };
            if let Some(v) = value {
                match name {
                    "confdir" => confdir = Some(v),
                    "format" => format = Some(v),
                    _ => configs.push(v),
                }
            }
        }
        i += 1;
    }
    (configs, confdir, format)
}

/// Joins a relative path onto the working directory and drops `.`/`..` segments.
fn absolute(path: &str, cwd: Option<&str>) -> String {
    let joined = match cwd {
        Some(c) if !path.starts_with('/') => Path::new(c).join(path),
        _ => PathBuf::from(path),
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

fn is_remote(path: &str) -> bool {
    path == "stdin:" || path.starts_with("http://") || path.starts_with("https://")
}

pub fn locate(p: &Process, fs: &Rooted) -> Located {
    let (flag_files, confdir_flag, format) = parse_flags(p.args);
    let env = |what: &str| p.flavour.env_name(what).iter().find_map(|n| (p.env)(n));
    let mut files: Vec<String> = flag_files
        .iter()
        .map(|f| {
            if is_remote(f) {
                f.clone()
            } else {
                absolute(f, p.cwd)
            }
        })
        .collect();
    let mut confdir = None;
    if let Some(dir) = confdir_flag
        .map(|d| absolute(&d, p.cwd))
        .filter(|d| fs.is_dir(d))
    {
        confdir = Some((dir, false));
    } else if let Some(dir) = env("confdir")
        .map(|d| absolute(&d, p.cwd))
        .filter(|d| fs.is_dir(d))
    {
        confdir = Some((dir, true));
    }
    if let Some((dir, _)) = &confdir {
        let exts = p.flavour.extensions(format.as_deref());
        for name in fs.list(dir) {
            // Go's regexp `^.+\.(json|...)$`: a name that is only the extension does not count.
            if exts
                .iter()
                .any(|e| name.len() > e.len() && name.ends_with(e))
            {
                files.push(format!("{}/{name}", dir.trim_end_matches('/')));
            }
        }
    }
    let confdir_path = confdir.as_ref().map(|(d, _)| d.clone());
    if !files.is_empty() {
        let origin = match confdir {
            Some((dir, from_env)) if flag_files.is_empty() => Origin::Confdir { dir, from_env },
            _ => Origin::Flags,
        };
        return Located {
            confdir: confdir_path,
            origin,
            files,
            format,
        };
    }
    if let Some(cwd) = p.cwd {
        let names: &[&str] = match p.flavour {
            Flavour::Xray => &[
                "config.json",
                "config.jsonc",
                "config.toml",
                "config.yaml",
                "config.yml",
            ],
            Flavour::V2ray => &["config.json"],
        };
        if let Some(f) = names
            .iter()
            .map(|n| absolute(n, Some(cwd)))
            .find(|f| fs.is_file(f))
        {
            return Located {
                confdir: None,
                origin: Origin::WorkingDirectory,
                files: vec![f],
                format,
            };
        }
    }
    let (dir, from_env) = match env("config") {
        Some(d) => (d, true),
        None => (
            Path::new(p.exe)
                .parent()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
            false,
        ),
    };
    let candidate = absolute(&format!("{}/config.json", dir.trim_end_matches('/')), p.cwd);
    if fs.is_file(&candidate) {
        return Located {
            confdir: None,
            origin: Origin::Location { from_env },
            files: vec![candidate],
            format,
        };
    }
    Located {
        confdir: None,
        origin: Origin::Stdin,
        files: vec!["stdin:".into()],
        format,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Tree(PathBuf);

    impl Tree {
        fn new(files: &[&str]) -> Tree {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "raylimit-locate-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            for f in files {
                let p = root.join(f.trim_start_matches('/'));
                if f.ends_with('/') {
                    fs::create_dir_all(&p).unwrap();
                } else {
                    fs::create_dir_all(p.parent().unwrap()).unwrap();
                    fs::write(&p, "{}").unwrap();
                }
            }
            fs::create_dir_all(&root).unwrap();
            Tree(root)
        }

        fn fs(&self) -> Rooted {
            Rooted {
                root: self.0.clone(),
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn run(tree: &Tree, args: &[&str], env: &[(&str, &str)], flavour: Flavour) -> Located {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.get(k).cloned();
        locate(
            &Process {
                args: &args,
                env: &lookup,
                cwd: Some("/srv/xray"),
                exe: "/usr/local/bin/xray",
                flavour,
            },
            &tree.fs(),
        )
    }

    #[test]
    fn flags_in_every_go_form_keep_their_order() {
        let t = Tree::new(&[]);
        let l = run(
            &t,
            &[
                "xray",
                "run",
                "-c",
                "a.json",
                "--config=/etc/b.json",
                "-config",
                "../c.yaml",
                "--c",
                "./d.toml",
                "-format=json",
                "-test",
                "-c",
                "stdin:",
                "x",
                "-c",
                "ignored",
            ],
            &[],
            Flavour::Xray,
        );
        assert_eq!(l.origin, Origin::Flags);
        assert_eq!(
            l.files,
            [
                "/srv/xray/a.json",
                "/etc/b.json",
                "/srv/c.yaml",
                "/srv/xray/d.toml",
                "stdin:"
            ]
        );
        assert_eq!(l.format.as_deref(), Some("json"));
        // V2Ray 4 has no `run` command; the flags come first.
        let l = run(
            &t,
            &["v2ray", "-config", "/etc/v2ray/config.json"],
            &[],
            Flavour::V2ray,
        );
        assert_eq!(l.files, ["/etc/v2ray/config.json"]);
    }

    #[test]
    fn confdir_files_follow_the_flag_files_sorted_by_name() {
        let t = Tree::new(&[
            "/etc/x/20-out.yaml",
            "/etc/x/10-in.json",
            "/etc/x/05.jsonc",
            "/etc/x/notes.txt",
            "/etc/x/.json",
            "/etc/x/sub.json/",
            "/e/99.toml",
        ]);
        let l = run(
            &t,
            &["xray", "run", "-c", "/a.json", "-confdir", "/etc/x"],
            &[],
            Flavour::Xray,
        );
        assert_eq!(l.origin, Origin::Flags);
        assert_eq!(
            l.files,
            [
                "/a.json",
                "/etc/x/05.jsonc",
                "/etc/x/10-in.json",
                "/etc/x/20-out.yaml"
            ]
        );
        let l = run(
            &t,
            &["xray", "-confdir=/etc/x", "-format", "yaml"],
            &[],
            Flavour::Xray,
        );
        assert_eq!(l.files, ["/etc/x/20-out.yaml"]);
        assert_eq!(
            l.origin,
            Origin::Confdir {
                dir: "/etc/x".into(),
                from_env: false
            }
        );
        // V2Ray reads only .json from a config directory.
        let l = run(&t, &["v2ray", "-confdir", "/etc/x"], &[], Flavour::V2ray);
        assert_eq!(l.files, ["/etc/x/10-in.json"]);
        // The flag wins over the environment; a flag naming no directory falls back to it.
        let env = [("XRAY_LOCATION_CONFDIR", "/e")];
        let l = run(&t, &["xray", "-confdir", "/etc/x"], &env, Flavour::Xray);
        assert_eq!(l.files.len(), 3);
        let l = run(&t, &["xray", "-confdir", "/nope"], &env, Flavour::Xray);
        assert_eq!(l.files, ["/e/99.toml"]);
        assert_eq!(
            l.origin,
            Origin::Confdir {
                dir: "/e".into(),
                from_env: true
            }
        );
        let l = run(
            &t,
            &["xray"],
            &[("xray.location.confdir", "/e")],
            Flavour::Xray,
        );
        assert_eq!(l.files, ["/e/99.toml"]);
    }

    #[test]
    fn defaults_in_xray_order() {
        let t = Tree::new(&["/srv/xray/config.yaml", "/srv/xray/config.toml"]);
        let l = run(&t, &["xray"], &[], Flavour::Xray);
        assert_eq!(
            (l.origin, l.files),
            (
                Origin::WorkingDirectory,
                vec!["/srv/xray/config.toml".to_string()]
            )
        );

        let t = Tree::new(&["/usr/local/bin/config.json", "/opt/loc/config.json"]);
        let l = run(&t, &["xray"], &[], Flavour::Xray);
        assert_eq!(l.origin, Origin::Location { from_env: false });
        assert_eq!(l.files, ["/usr/local/bin/config.json"]);
        let l = run(
            &t,
            &["xray"],
            &[("XRAY_LOCATION_CONFIG", "/opt/loc")],
            Flavour::Xray,
        );
        assert_eq!(l.origin, Origin::Location { from_env: true });
        assert_eq!(l.files, ["/opt/loc/config.json"]);
        // V2Ray reads its own variable, not Xray's.
        let l = run(
            &t,
            &["v2ray"],
            &[("XRAY_LOCATION_CONFIG", "/opt/loc")],
            Flavour::V2ray,
        );
        assert_eq!(l.files, ["/usr/local/bin/config.json"]);

        let t = Tree::new(&[]);
        let l = run(&t, &["xray", "run"], &[], Flavour::Xray);
        assert_eq!(
            (l.origin, l.files),
            (Origin::Stdin, vec!["stdin:".to_string()])
        );
    }
}
