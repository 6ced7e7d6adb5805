//! Owner annotations: which runtime each managed rule belongs to, kept in a small JSON file under
//! `/run/raylimit/` (lost at reboot, exactly like tc state), written atomically, and a lock that
//! keeps two raylimit runs from interleaving their changes. `RAYLIMIT_STATE_DIR` moves both.
//!
//! The kernel stays the source of truth for what exists: without the file, managed objects are
//! still recognised (by their root handle) and reported with an unknown owner.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::policy::SubjectKey;

pub const DEFAULT_STATE_DIR: &str = "/run/raylimit";
const STATE_FILE: &str = "owners.json";
const LOCK_FILE: &str = "lock";
/// How long a run waits for another one to finish before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// One managed rule and its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// The network namespace (`--netns`), empty for the current one.
    pub netns: Shared,
    /// The device the operator named.
    pub device: Shared,
    pub direction: Shared,
    /// The subject's key (`ip 10.0.0.1`, `ip all`).
    pub subject: SubjectKey,
    /// The device whose root holds the rule (the device, or its IFB).
    pub shaped_device: Shared,
    /// The leaf class, when the rule has one (the unlimited exception has none).
    #[serde(default)]
    pub class_minor: Option<u16>,
    /// The limit in bytes per second (`None`: unlimited, or recorded before rates were): what a
    /// later run restores when the kernel has lost the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    pub owner: Shared,
    /// How the runtime was described when the rule was made (for reports only).
    #[serde(default)]
    pub runtime: Shared,
    /// The expanded set the rule belongs to (`per_ip`), when it was not asked for by itself.
    #[serde(default)]
    pub set: Option<String>,
}

/// The state file: read and written typed (a generic JSON value costs as much as the kernel
/// dump itself once thousands of rules are managed).
#[derive(Serialize, Deserialize)]
struct StateFile<T> {
    version: u32,
    rules: T,
    /// Shared objects raylimit created (not adopted): only these does it ever delete.
    #[serde(default)]
    made: Vec<Made>,
}

/// A shared object raylimit created: an ingress hook (clsact) on a device, or an IFB.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Made {
    pub netns: String,
    pub device: String,
    /// `ingress-hook` or `ifb`.
    pub object: String,
}

/// All annotations, by rule: (netns, shaped device, subject key as written, owner), so they list
/// in the order the state file and earlier versions always gave. Two runtimes may each hold a
/// rule for the same subject on one device (each scoped to its own listeners).
#[derive(Debug, Clone, Default)]
pub struct Annotations {
    /// By (namespace, shaped device, subject, owner); the subject as its typed key, so a
    /// lookup formats nothing.
    entries: BTreeMap<Key, Annotation>,
    made: std::collections::BTreeSet<Made>,
    /// The one copy of each string the entries repeat.
    strings: std::collections::BTreeSet<Shared>,
}

impl PartialEq for Annotations {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries && self.made == other.made
    }
}

impl Eq for Annotations {}

impl Annotations {
    /// Makes `a`'s repeated strings the copies already held (or holds them): a rule costs its
    /// subject and a few pointers, not six strings of its own.
    fn share(&mut self, a: &mut Annotation) {
        let fields = [
            &mut a.netns,
            &mut a.device,
            &mut a.direction,
            &mut a.shaped_device,
            &mut a.owner,
            &mut a.runtime,
        ];
        for field in fields {
            match self.strings.get(&**field) {
                Some(held) => *field = held.clone(),
                None => {
                    self.strings.insert(field.clone());
                }
            }
        }
    }
}

type Key = (Shared, Shared, SubjectKey, Shared);

/// A string many annotations repeat (the namespace, the devices, the direction, the owner, the
/// runtime): shared, so 10 000 rules keep one copy of each. It reads and compares as a `str`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shared(std::rc::Rc<str>);

impl Shared {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Shared {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Shared {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Shared {
    fn from(s: &str) -> Self {
        Shared(s.into())
    }
}

impl PartialEq<str> for Shared {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Shared {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Shared {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Shared> for String {
    fn eq(&self, other: &Shared) -> bool {
        **self == *other.0
    }
}

fn key(netns: &str, shaped_device: &str, subject: &SubjectKey, owner: &str) -> Key {
    (
        netns.into(),
        shaped_device.into(),
        subject.clone(),
        owner.into(),
    )
}

/// An annotation's key, sharing its strings.
fn key_of(a: &Annotation) -> Key {
    (
        a.netns.clone(),
        a.shaped_device.clone(),
        a.subject.clone(),
        a.owner.clone(),
    )
}

impl Annotations {
    pub fn iter(&self) -> impl Iterator<Item = &Annotation> {
        self.entries.values()
    }

    /// The owner's annotation of its rule for `subject`.
    pub fn find(
        &self,
        netns: &str,
        shaped_device: &str,
        subject: &SubjectKey,
        owner: &str,
    ) -> Option<&Annotation> {
        self.entries.get(&key(netns, shaped_device, subject, owner))
    }

    /// Every owner's annotation of a rule for `subject`.
    pub fn for_subject<'a>(
        &'a self,
        netns: &'a str,
        shaped_device: &'a str,
        subject: &SubjectKey,
    ) -> impl Iterator<Item = &'a Annotation> + 'a {
        let subject = subject.clone();
        let from = key(netns, shaped_device, &subject, "");
        self.entries
            .range(from..)
            .take_while(move |((n, d, s, _), _)| n == netns && d == shaped_device && *s == subject)
            .map(|(_, a)| a)
    }

    /// The annotation of the rule whose class is `minor` on `shaped_device`.
    pub fn by_class(&self, netns: &str, shaped_device: &str, minor: u16) -> Option<&Annotation> {
        self.iter().find(|a| {
            a.netns == netns && a.shaped_device == shaped_device && a.class_minor == Some(minor)
        })
    }

    /// The rules of one owner's expanded set on a shaped device.
    pub fn in_set<'a>(
        &'a self,
        netns: &'a str,
        shaped_device: &'a str,
        owner: &'a str,
        set: &'a str,
    ) -> impl Iterator<Item = &'a Annotation> + 'a {
        self.iter().filter(move |a| {
            a.netns == netns
                && a.shaped_device == shaped_device
                && a.owner == owner
                && a.set.as_deref() == Some(set)
        })
    }

    pub fn upsert(&mut self, mut a: Annotation) {
        self.share(&mut a);
        self.entries.insert(key_of(&a), a);
    }

    /// Forgets the owner's annotation of `subject`; true when there was one.
    pub fn remove(
        &mut self,
        netns: &str,
        shaped_device: &str,
        subject: &SubjectKey,
        owner: &str,
    ) -> bool {
        self.entries
            .remove(&key(netns, shaped_device, subject, owner))
            .is_some()
    }

    /// True when recording these annotations over `earlier` (theirs winning, `earlier`'s kept
    /// where they have none) would change what `earlier` holds.
    pub fn adds_to(&self, earlier: &Annotations) -> bool {
        self.entries
            .iter()
            .any(|(k, a)| earlier.entries.get(k) != Some(a))
            || !self.made.is_subset(&earlier.made)
    }

    /// True when `earlier` holds a rule or made object these annotations lack.
    pub fn lack_any_of(&self, earlier: &Annotations) -> bool {
        earlier
            .entries
            .keys()
            .any(|k| !self.entries.contains_key(k))
            || !earlier.made.is_subset(&self.made)
    }

    /// These annotations and every rule of `earlier` they lack, in key order, by reference:
    /// what a run records before it changes the kernel (a removal is forgotten only once it is
    /// done) without copying either set.
    fn keeping<'a>(&'a self, earlier: &'a Annotations) -> Vec<&'a Annotation> {
        let mut mine = self.entries.iter().peekable();
        let mut theirs = earlier.entries.iter().peekable();
        let mut all = Vec::with_capacity(self.entries.len().max(earlier.entries.len()));
        loop {
            let next = match (mine.peek(), theirs.peek()) {
                (Some((a, _)), Some((b, _))) => match a.cmp(b) {
                    std::cmp::Ordering::Less => mine.next(),
                    std::cmp::Ordering::Equal => {
                        theirs.next();
                        mine.next()
                    }
                    std::cmp::Ordering::Greater => theirs.next(),
                },
                (Some(_), None) => mine.next(),
                (None, Some(_)) => theirs.next(),
                (None, None) => break,
            };
            all.extend(next.map(|(_, a)| a));
        }
        all
    }

    /// raylimit created `object` on `device` (so it may delete it).
    pub fn made(&self, netns: &str, device: &str, object: &str) -> bool {
        // A handful of entries, asked once per staged rule: a scan allocates nothing.
        self.made
            .iter()
            .any(|m| m.netns == netns && m.device == device && m.object == object)
    }

    /// Records that raylimit created `object` on `device` (`true`), or that it is gone.
    pub fn set_made(&mut self, netns: &str, device: &str, object: &str, made: bool) -> bool {
        let m = Made {
            netns: netns.into(),
            device: device.into(),
            object: object.into(),
        };
        match made {
            true => self.made.insert(m),
            false => self.made.remove(&m),
        }
    }
}

/// The directory holding the annotations and the lock.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
}

/// Held while a run changes the kernel; released when dropped.
pub struct Lock {
    file: File,
}

impl Lock {
    /// Tells a run waiting for the lock that this one is still making progress (the lock
    /// file's modification time).
    pub fn heartbeat(&self) {
        let _ = self.file.set_modified(std::time::SystemTime::now());
    }

    /// Writes the holder's pid into the lock file (what a waiting run reports and checks).
    /// The pid is written over the old one at a fixed width (a pid has at most 7 digits), not
    /// after a truncate: ext4 flushes a truncated file to disk on close, which would cost every
    /// run a write-back.
    fn announce(&self) {
        use std::os::unix::fs::FileExt;
        let _ = self
            .file
            .write_all_at(format!("{:<15}\n", std::process::id()).as_bytes(), 0);
        self.heartbeat();
    }
}

/// The run holding the lock at `path`, when it is alive and has shown progress within the
/// last LOCK_WAIT: its pid.
fn live_holder(path: &std::path::Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let fresh = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < LOCK_WAIT);
    (fresh && std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Larger state files are refused: a few hundred bytes per rule makes this tens of thousands of
/// rules, and reading one must not cost the host unbounded memory.
pub const MAX_STATE_BYTES: u64 = 16 << 20;

/// The state file exists but cannot be trusted: raylimit refuses to act on it and keeps it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the owner annotations in {path} cannot be read ({why}); the file is kept as it is. raylimit will not change limits without knowing who owns them: inspect it, or move it aside (mv {path} {path}.bad) to start again with every managed object unannotated (status lists them, and a request for a subject adopts its objects)")]
pub struct StateError {
    pub path: String,
    pub why: String,
}

impl StateDir {
    /// `RAYLIMIT_STATE_DIR`, or `/run/raylimit`.
    pub fn from_env() -> Self {
        let path = std::env::var_os("RAYLIMIT_STATE_DIR")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        StateDir { path }
    }

    /// The directory, root's only (0700 whatever the umask), never through a symlink.
    fn ensure_dir(&self) -> Result<(), String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symlink; raylimit keeps its state only in a real directory",
                    self.path.display()
                ))
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!("{} is not a directory", self.path.display()))
            }
            Ok(m) => {
                if m.permissions().mode() & 0o077 != 0 {
                    fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
                        .map_err(|e| format!("cannot restrict {}: {e}", self.path.display()))?;
                }
                return Ok(());
            }
            Err(_) => {}
        }
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", self.path.display())),
        }
        // The mode given to mkdir is masked by the umask; this is not.
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", self.path.display()))
    }

    /// Opens a file of the state directory for writing: 0600, never through a symlink.
    fn open_private(&self, path: &std::path::Path, truncate: bool) -> std::io::Result<File> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = OpenOptions::new()
            .create(true)
            .truncate(truncate)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        Ok(file)
    }

    /// Takes the exclusive lock, waiting up to 30 s for another run to finish.
    pub fn lock(&self) -> Result<Lock, String> {
        self.ensure_dir()?;
        let path = self.path.join(LOCK_FILE);
        let file = self
            .open_private(&path, false)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let deadline = Instant::now() + LOCK_WAIT;
        let mut told = false;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                let lock = Lock { file };
                lock.announce();
                return Ok(lock);
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(format!("cannot lock {}: {err}", path.display()));
            }
            if Instant::now() >= deadline {
                // A long run (thousands of limits) that is still making progress is waited
                // for; one that shows none for LOCK_WAIT is not.
                match live_holder(&path) {
                    Some(pid) => {
                        if !told {
                            eprintln!(
                                "raylimit: waiting for raylimit run {pid}, which holds {} and is making progress",
                                path.display()
                            );
                            told = true;
                        }
                    }
                    None => {
                        return Err(format!(
                            "another raylimit run has held {} for {} s without progress; try again when it has finished",
                            path.display(),
                            LOCK_WAIT.as_secs()
                        ))
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The annotations. No file means none; a file that is not a regular file, is larger than
    /// `MAX_STATE_BYTES`, or does not parse is an error (it is never treated as empty, which
    /// would let the next save drop every rule it records).
    pub fn load(&self) -> Result<Annotations, StateError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path.join(STATE_FILE);
        let bad = |why: String| StateError {
            path: path.display().to_string(),
            why,
        };
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Annotations::default()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(bad("it is a symlink".into()))
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("it is not a regular file".into()));
        }
        if meta.len() > MAX_STATE_BYTES {
            return Err(bad(format!(
                "{} bytes, more than the {} raylimit reads",
                meta.len(),
                MAX_STATE_BYTES
            )));
        }
        let mut text = String::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        let file = serde_json::from_str::<StateFile<Vec<Annotation>>>(&text)
            .map_err(|e| bad(format!("not raylimit's state: {e}")))?;
        if file.version != 1 {
            return Err(bad(format!("version {}, not 1", file.version)));
        }
        // Built at once from the sorted list, the map's nodes are full; inserted one by one in
        // key order, each split leaves one half empty (a third more memory at 10 000 rules).
        // The last of two records of one rule wins, as an insert would.
        let mut annotations = Annotations {
            made: file.made.into_iter().collect(),
            ..Annotations::default()
        };
        let mut rules = file.rules;
        for a in &mut rules {
            annotations.share(a);
        }
        annotations.entries = rules.into_iter().map(|a| (key_of(&a), a)).collect();
        Ok(annotations)
    }

    /// Writes the annotations atomically (a temporary file renamed over the old one); the
    /// temporary file never outlives a failure.
    pub fn save(&self, annotations: &Annotations) -> Result<(), String> {
        let made = annotations.made.iter().cloned().collect();
        self.write(annotations.iter().collect(), made)
    }

    /// Saves `annotations` with every rule and made object of `earlier` they lack: a run's
    /// intent, recorded before it changes the kernel.
    pub fn save_intent(
        &self,
        annotations: &Annotations,
        earlier: &Annotations,
    ) -> Result<(), String> {
        let made = annotations.made.union(&earlier.made).cloned().collect();
        self.write(annotations.keeping(earlier), made)
    }

    fn write(&self, rules: Vec<&Annotation>, made: Vec<Made>) -> Result<(), String> {
        use std::io::Write;
        self.ensure_dir()?;
        // Compact: with thousands of rules, every run reads it whole.
        let text = serde_json::to_string(&StateFile {
            version: 1,
            rules,
            made,
        })
        .map_err(|e| e.to_string())?;
        let tmp = self
            .path
            .join(format!("{STATE_FILE}.{}", std::process::id()));
        let target = self.path.join(STATE_FILE);
        let written = self
            .open_private(&tmp, true)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_data()
            })
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
            .and_then(|()| {
                fs::rename(&tmp, &target)
                    .map_err(|e| format!("cannot replace {}: {e}", target.display()))
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_run_waits_only_for_a_live_holder_that_makes_progress() {
        let dir = std::env::temp_dir().join(format!("raylimit-lock-{}", std::process::id()));
        let state = StateDir { path: dir.clone() };
        let lock = state.lock().unwrap();
        let path = dir.join(LOCK_FILE);
        assert_eq!(live_holder(&path), Some(std::process::id()));
        // No heartbeat for longer than a waiter waits: not making progress.
        let old = std::time::SystemTime::now() - LOCK_WAIT - Duration::from_secs(1);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(live_holder(&path), None);
        lock.heartbeat();
        assert_eq!(live_holder(&path), Some(std::process::id()));
        // A holder that is gone (pid_max is at most 2^22).
        fs::write(&path, "4194305\n").unwrap();
        assert_eq!(live_holder(&path), None);
        drop(lock);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn rule(ip: &str, owner: &str) -> Annotation {
        Annotation {
            netns: "".into(),
            device: "eth0".into(),
            direction: "download".into(),
            subject: SubjectKey::Ip(ip.parse().unwrap()),
            shaped_device: "eth0".into(),
            class_minor: Some(1),
            rate: Some(1000),
            owner: owner.into(),
            runtime: "xray".into(),
            set: None,
        }
    }

    #[test]
    fn rules_share_their_repeated_strings_when_recorded_and_when_read_back() {
        let same = |a: &Shared, b: &Shared| std::rc::Rc::ptr_eq(&a.0, &b.0);
        let mut annotations = Annotations::default();
        annotations.upsert(rule("10.0.0.1", "host:/usr/bin/xray"));
        annotations.upsert(rule("10.0.0.2", "host:/usr/bin/xray"));
        annotations.upsert(rule("10.0.0.3", "host:/usr/bin/v2ray"));
        let all: Vec<&Annotation> = annotations.iter().collect();
        assert!(same(&all[0].owner, &all[1].owner) && same(&all[0].device, &all[1].device));
        assert!(same(&all[0].device, &all[2].shaped_device));
        assert!(!same(&all[0].owner, &all[2].owner));
        assert_eq!(all[2].owner, "host:/usr/bin/v2ray");

        let dir = std::env::temp_dir().join(format!("raylimit-share-{}", std::process::id()));
        let state = StateDir { path: dir.clone() };
        state.save(&annotations).unwrap();
        let read = state.load().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read, annotations);
        let all: Vec<&Annotation> = read.iter().collect();
        assert!(same(&all[0].owner, &all[1].owner) && same(&all[1].runtime, &all[2].runtime));
    }
}
