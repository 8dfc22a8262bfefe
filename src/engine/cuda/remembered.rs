//! What fastdet remembers per device between runs (the measured convolution choices, the kernel
//! checks): small JSON maps beside the compiled kernels, keyed by what the entry is valid for.
//!
//! A file is always written whole and renamed into place, so a reader never sees half of one.
//! Writers take turns, threads of a process by a mutex and processes by an exclusive lock on
//! `<file>.lock`, and each re-reads the file under the lock, so none loses another's entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::gpu::Gpu;
use super::kernels::SOURCES;

/// One remembered map: `{key: entry}` in a JSON file, or nowhere (nothing remembered).
#[derive(Debug, Clone)]
pub struct JsonStore {
    path: Option<PathBuf>,
}

/// Writers in this process take turns (two workers may finish at once).
static WRITE: Mutex<()> = Mutex::new(());

impl JsonStore {
    pub fn at(path: PathBuf) -> JsonStore {
        JsonStore { path: Some(path) }
    }

    pub fn none() -> JsonStore {
        JsonStore { path: None }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Every entry; a missing file is empty, an unreadable or malformed one too (with a warning
    /// naming `what` it should hold: the next write replaces it).
    pub fn read_all<T: DeserializeOwned>(&self, what: &str) -> BTreeMap<String, T> {
        let Some(p) = &self.path else { return BTreeMap::new() };
        let Ok(text) = std::fs::read_to_string(p) else { return BTreeMap::new() };
        match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                crate::errln!("warning: {}: not a file of {what} ({e}); starting afresh", p.display());
                BTreeMap::new()
            }
        }
    }

    pub fn get<T: DeserializeOwned>(&self, what: &str, key: &str) -> Option<T> {
        self.read_all(what).remove(key)
    }

    /// Adds or replaces `keys`, each with `entry`, keeping every other entry of the file.
    pub fn put<T: Serialize + DeserializeOwned + Clone>(&self, what: &str, keys: &[String], entry: &T) -> Result<()> {
        self.update(what, |all: &mut BTreeMap<String, T>| {
            for key in keys {
                all.insert(key.clone(), entry.clone());
            }
        })
    }

    /// Removes `keys` (a file without them is left as it is).
    pub fn remove<T: Serialize + DeserializeOwned>(&self, what: &str, keys: &[String]) -> Result<()> {
        if self.path.as_ref().is_none_or(|p| !p.exists()) {
            return Ok(());
        }
        let all = self.read_all::<T>(what);
        if !keys.iter().any(|k| all.contains_key(k)) {
            return Ok(());
        }
        self.update(what, |all: &mut BTreeMap<String, T>| {
            for key in keys {
                all.remove(key);
            }
        })
    }

    /// Reads the file, changes it and writes it whole, in turn with the other writers.
    fn update<T: Serialize + DeserializeOwned>(&self, what: &str, change: impl FnOnce(&mut BTreeMap<String, T>)) -> Result<()> {
        let Some(p) = &self.path else { return Ok(()) };
        let _turn = WRITE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        }
        let _lock = lock_file(&p.with_extension("json.lock"))?;
        let mut all: BTreeMap<String, T> = self.read_all(what);
        change(&mut all);
        let tmp = p.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_string_pretty(&all)?).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, p).with_context(|| format!("{}: cannot replace", p.display()))
    }
}

/// How long a writer waits for another process's lock before giving up on remembering.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Linux's "no locks available" (`ENOLCK`), which some network file systems answer.
const ENOLCK: i32 = 37;

/// The exclusive lock on `path` (released with the returned handle), waiting at most `LOCK_WAIT`
/// for another process. A file system that does not lock files gives no lock, with a warning,
/// and the write goes ahead without one (two processes writing at once may then lose an entry).
fn lock_file(path: &Path) -> Result<Option<std::fs::File>> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let started = std::time::Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(std::fs::TryLockError::WouldBlock) => bail!("{}: another process has held it for {} s", path.display(), LOCK_WAIT.as_secs()),
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(ENOLCK) => {
                crate::errln!("warning: {}: the file system does not lock files ({e}); writing without a lock", path.display());
                return Ok(None);
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("{}: cannot lock", path.display())),
        }
    }
}

/// The first 16 hex digits of `bytes`' SHA-256.
pub fn short_hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))[..16].to_string()
}

/// The device as a key: name, architecture, SMs and driver.
pub fn device_key(gpu: &Gpu) -> String {
    let i = &gpu.info;
    format!("{} sm_{}{} {} SMs driver {}", i.name, i.compute_capability.0, i.compute_capability.1, i.multiprocessors, i.driver_version)
}

/// fastdet's version and a hash of every kernel's source.
pub fn kernels_key() -> String {
    let mut kernels = Vec::new();
    for (name, src) in SOURCES {
        kernels.extend_from_slice(name.as_bytes());
        kernels.extend_from_slice(src.as_bytes());
    }
    format!("fastdet {} kernels {}", env!("CARGO_PKG_VERSION"), short_hash(&kernels))
}

/// A lock per device of this process (emulated devices apart from real ones): work that must not
/// share the device with itself (timing, checking) takes turns on it.
pub fn device_lock(gpu: &Gpu) -> Arc<Mutex<()>> {
    type Locks = Mutex<Vec<((bool, usize), Arc<Mutex<()>>)>>;
    static LOCKS: Locks = Mutex::new(Vec::new());
    let id = (gpu.is_emulator(), gpu.info.ordinal);
    let mut locks = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, l)) = locks.iter().find(|(k, _)| *k == id) {
        return l.clone();
    }
    let l = Arc::new(Mutex::new(()));
    locks.push((id, l.clone()));
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process holding the writers' lock: a write waits for it, then keeps what that
    /// process wrote (read under the lock) beside its own entry; no temporary file stays.
    #[test]
    fn a_write_waits_for_another_writer_and_keeps_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("things.json");
        let store = JsonStore::at(file.clone());
        // Held as a second process would hold it: another open file description.
        let other = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(file.with_extension("json.lock")).unwrap();
        other.lock().unwrap();
        std::thread::scope(|s| {
            let writer = s.spawn(|| store.put("things", &["mine".into()], &1u32));
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(!writer.is_finished() && !file.exists(), "wrote while another writer held the lock");
            // What the other writer stores before it lets go.
            std::fs::write(&file, r#"{"theirs": 2}"#).unwrap();
            other.unlock().unwrap();
            writer.join().unwrap().unwrap();
        });
        assert_eq!(store.read_all::<u32>("things"), BTreeMap::from([("mine".to_string(), 1), ("theirs".to_string(), 2)]));
        store.put("things", &["a".into(), "b".into()], &3u32).unwrap();
        assert_eq!(store.get::<u32>("things", "b"), Some(3));
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["things.json", "things.json.lock"]);
        // A damaged file reads as empty and is replaced whole by the next write.
        std::fs::write(&file, "{ not json").unwrap();
        assert!(store.read_all::<u32>("things").is_empty());
        store.put("things", &["c".into()], &4u32).unwrap();
        assert_eq!(store.read_all::<u32>("things"), BTreeMap::from([("c".to_string(), 4)]));
        let before = std::fs::metadata(&file).unwrap().modified().unwrap();
        store.remove::<u32>("things", &["absent".into()]).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), before, "nothing to remove: the file is left as it is");
        store.put("things", &["e".into()], &6u32).unwrap();
        store.remove::<u32>("things", &["c".into(), "absent".into()]).unwrap();
        assert_eq!(store.read_all::<u32>("things"), BTreeMap::from([("e".to_string(), 6)]));
        // Nowhere: nothing kept, nothing read.
        JsonStore::none().put("things", &["d".into()], &5u32).unwrap();
        assert!(JsonStore::none().read_all::<u32>("things").is_empty());
    }
}
