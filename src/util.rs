//! Small helpers shared by the writers.
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `println!` that returns an error instead of panicking when standard output cannot be written.
#[macro_export]
macro_rules! outln {
    () => { $crate::util::out_line(format_args!("")) };
    ($($t:tt)*) => { $crate::util::out_line(format_args!($($t)*)) };
}

/// `eprintln!` that never panics: a log that cannot be written (a reader that went away, a full
/// disk under the job's log file) does not stop the work, whose outputs are files.
#[macro_export]
macro_rules! errln {
    () => { $crate::util::err_text(format_args!("\n")) };
    ($($t:tt)*) => { $crate::util::err_text(format_args!("{}\n", format_args!($($t)*))) };
}

/// `eprint!` as [`errln!`].
#[macro_export]
macro_rules! errprint {
    ($($t:tt)*) => { $crate::util::err_text(format_args!($($t)*)) };
}

/// Writes to standard error, ignoring failures (see [`errln!`]).
pub fn err_text(text: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(text);
}

/// Prints one line on standard output; a failed write (`> /dev/full`) is an error, not a panic.
pub fn out_line(line: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("cannot write to standard output")
}

/// Prints `text` as it is on standard output, as [`out_line`].
pub fn out_text(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("cannot write to standard output")
}

/// What is removed when the process is stopped by SIGINT, SIGTERM or SIGHUP: the temporary files
/// being written and a synthetic dataset being built, and the output folders it made when they
/// are still empty (`true`). (SIGKILL gives no chance; those stay.)
static ON_STOP: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

/// Set once a stop signal has come: the process is about to end by it.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a stop signal has come (`main` then waits for the end instead of reporting the errors
/// the removal of its files caused).
pub fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::SeqCst)
}

/// SIGINT, SIGTERM and SIGHUP, but those the process was started with ignored (`nohup`, a job
/// started in the background by a script): those stay ignored.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it; sigaction with a null
    // new action only reads the current one.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
            let ignored = libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) == 0 && old.assume_init().sa_sigaction == libc::SIG_IGN;
            if !ignored {
                libc::sigaddset(set.as_mut_ptr(), sig);
            }
        }
        set.assume_init()
    }
}

/// Called first in `main`, before any other thread exists (threads inherit the mask; child
/// processes get a cleared one from std): the stop signals are blocked everywhere and taken by
/// one thread, which removes what [`RemoveOnStop`] holds, then ends the process by the same
/// signal (so the exit status is the usual 128 + N).
pub fn handle_stop_signals() {
    let set = stop_signals();
    // SAFETY: a valid set; no other thread exists yet.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let spawned = std::thread::Builder::new().name("stop-signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set and out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        // Renames into place that began before the signal end first.
        let _gate = STOP_GATE.lock().unwrap_or_else(|p| p.into_inner());
        // Other threads run on meanwhile: a parallel writer may make a folder again just after
        // it is removed, or register a new temporary, so a few rounds, until nothing is left.
        for _ in 0..20 {
            let paths = ON_STOP.lock().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone());
            for (p, only_empty) in paths.iter().rev() {
                let _ = if *only_empty { std::fs::remove_dir(p) } else { remove_path(p) };
            }
            if !paths.iter().any(|(p, only_empty)| !only_empty && p.symlink_metadata().is_ok()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        // SAFETY: the default action for a signal unblocked in this thread ends the process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut one = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(one.as_mut_ptr());
            libc::sigaddset(one.as_mut_ptr(), sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, one.as_ptr(), std::ptr::null_mut());
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    });
    if spawned.is_err() {
        // Without the thread the signals must stay deliverable.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

/// In `main` before it returns: once a stop signal has come, the signal thread ends the process
/// (by the signal) as soon as its files are removed; nothing else is reported.
pub fn wait_if_stopping() {
    if stopping() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Removes `path` if the process is stopped by a signal while this guard lives.
pub struct RemoveOnStop((PathBuf, bool));

impl RemoveOnStop {
    /// Registers `path` before it is made. Once a stop signal has come nothing new is begun: the
    /// caller waits here for the end.
    pub fn new(path: &Path) -> Self {
        Self::register(path, false)
    }

    /// Registers an output folder the process made: removed on a stop only when it is empty
    /// (the files of runs finished before the stop stay).
    pub fn empty_folder(path: &Path) -> Self {
        Self::register(path, true)
    }

    fn register(path: &Path, only_empty: bool) -> Self {
        wait_if_stopping();
        let entry = (path.to_path_buf(), only_empty);
        if let Ok(mut g) = ON_STOP.lock() {
            g.push(entry.clone());
        }
        RemoveOnStop(entry)
    }

    /// Runs `commit` (the renames that put a finished output in place) with the signal thread
    /// held off, unless a stop signal has already come: a stop leaves the output either whole
    /// or removed, never half moved.
    pub fn commit<T>(self, commit: impl FnOnce() -> Result<T>) -> Result<T> {
        with_stops_held(|| {
            let r = commit();
            // Deregistered before the signal thread may look.
            drop(self);
            r
        })
    }
}

/// Runs `f` while the signal thread cannot start its removals (it sets STOPPING, then takes
/// STOP_GATE before removing anything); once a stop signal has come, `f` is not begun.
fn with_stops_held<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let gate = STOP_GATE.lock().unwrap_or_else(|p| p.into_inner());
    if stopping() {
        drop(gate);
        wait_if_stopping();
    }
    f()
}

/// Held while outputs are renamed into place; the signal thread takes it before it removes
/// anything, so it waits for those renames to end.
static STOP_GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for RemoveOnStop {
    fn drop(&mut self) {
        if let Ok(mut g) = ON_STOP.lock() {
            if let Some(i) = g.iter().rposition(|p| *p == self.0) {
                g.remove(i);
            }
        }
    }
}

/// The folder `path` is in (`.` for a bare name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.{name}.{pid}.{what}` beside `path`: the hidden name this process writes `path`'s
/// temporary (`tmp`), sets an old file aside (`old`) or builds a dataset (`partial`) under.
pub fn hidden_sibling(path: &Path, what: &str) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    Ok(folder_of(path).join(format!(".{}.{}.{what}", name.to_string_lossy(), std::process::id())))
}

/// Removes the temporaries (`.{name}.{pid}.tmp`, see [`hidden_sibling`]) that other processes
/// left in `folder` when they were killed outright (`kill -9` cannot be caught), for one file
/// `name` or for every name. Only for a folder the caller alone writes (it holds its lock):
/// elsewhere a temporary may belong to a live process, here or on another node. Returns how
/// many were removed.
pub fn remove_stale_temporaries(folder: &Path, name: Option<&std::ffi::OsStr>) -> usize {
    let mine = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir(folder) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix('.')).and_then(|f| f.strip_suffix(".tmp")) else { continue };
        let Some((stem, pid)) = rest.rsplit_once('.') else { continue };
        let for_name = name.is_none_or(|n| n.to_str() == Some(stem));
        if for_name && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && pid != mine && entry.file_type().is_ok_and(|t| t.is_file()) {
            removed += usize::from(std::fs::remove_file(entry.path()).is_ok());
        }
    }
    removed
}

/// Removes a file, a link, or a folder with everything in it.
pub fn remove_path(p: &Path) -> std::io::Result<()> {
    if p.is_dir() && !p.is_symlink() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// The folder `path` is written in, when it exists (`.` for a bare file name).
fn output_dir(path: &Path) -> Result<PathBuf> {
    let dir = folder_of(path);
    if !dir.is_dir() {
        anyhow::bail!("{}: output directory {} does not exist", path.display(), dir.display());
    }
    Ok(dir)
}

/// Refuses an output whose place holds what a write must not replace: a device or a pipe (a
/// plain file would take its place: `--out /dev/null` run as root), a folder, or a loop of links.
pub fn check_replaceable(path: &Path) -> Result<()> {
    let target = write_target(path);
    if target.is_symlink() {
        anyhow::bail!("{}: is a loop of symbolic links", path.display());
    }
    if target.exists() && !target.is_file() {
        let what = if target.is_dir() { "a directory" } else { "not a plain file (a device, pipe or socket)" };
        anyhow::bail!("{}: is {what}; give a file name", path.display());
    }
    Ok(())
}

/// Refuses an output file that `write_atomic` could not write, before the work that makes it.
pub fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("{}: is a directory; give a file name", path.display());
    }
    check_replaceable(path)?;
    let target = write_target(path);
    let dir = output_dir(&target)?;
    // The temporary write_atomic will make, made and removed now: a name too long for it or a
    // folder that takes no files fails here, not after the work.
    let tmp = hidden_sibling(&target, "tmp")?;
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
        }
        // One of an earlier process with this id: the name can be made.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("{}: cannot write there (trying {})", path.display(), tmp.display())),
    }
    // A file of someone else's in a shared folder with the sticky bit (/tmp, a scratch space)
    // cannot be replaced, only written by its owner.
    use std::os::unix::fs::MetadataExt;
    if let (Ok(f), Ok(d)) = (std::fs::symlink_metadata(&target), std::fs::metadata(&dir)) {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if sticky_forbids_replacing(d.mode(), d.uid(), f.uid(), me) {
            anyhow::bail!("{}: belongs to another user in a folder with the sticky bit, so it cannot be replaced; give another name", path.display());
        }
    }
    Ok(())
}

/// `path` with its folder resolved (links, `..`) but not its last component: the file a rename
/// onto `path` replaces.
fn resolved_parent(path: &Path) -> Option<PathBuf> {
    // The deepest folder that exists is resolved; the names below it are kept as they are.
    let mut rest = vec![path.file_name()?.to_os_string()];
    let mut dir = path.parent()?.to_path_buf();
    while !dir.as_os_str().is_empty() && !dir.exists() {
        rest.push(dir.file_name()?.to_os_string());
        dir = dir.parent()?.to_path_buf();
    }
    let base = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    Some(rest.iter().rev().fold(base.canonicalize().ok()?, |p, n| p.join(n)))
}

/// Whether writes to `a` and to `b` would replace one file (the same name, through links and `..`
/// too): two outputs of one job that collide, the last written wins.
pub fn same_written_file(a: &Path, b: &Path) -> bool {
    match (resolved_parent(&write_target(a)), resolved_parent(&write_target(b))) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Refuses an output that would replace one of `inputs` (a file) or land inside one (a folder,
/// such as a zarr store), before any work: `--out` mistyped as a weights file is not overwritten.
pub fn check_not_an_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    // Where the output goes: through a link, write_atomic writes the file it points to.
    let Some(target) = resolved_parent(&write_target(out)) else { return Ok(()) };
    for input in inputs {
        // The input as named and the file it stands for.
        let forms = [resolved_parent(input), input.canonicalize().ok()];
        for form in forms.iter().flatten() {
            if *form == target {
                anyhow::bail!("{}: is also an input ({}); give another output", out.display(), input.display());
            }
            if input.is_dir() && target.starts_with(form) {
                anyhow::bail!("{}: lies inside the input {}; give an output outside it", out.display(), input.display());
            }
        }
    }
    Ok(())
}

/// The file a write to `path` replaces: `path`, or the file its symbolic link points to (a link
/// into a shared folder stays a link, and the shared file gets the new content).
pub fn write_target(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::read_link(&p) {
            Ok(to) => p = if to.is_absolute() { to } else { p.parent().unwrap_or(Path::new("")).join(to) },
            Err(_) => break,
        }
    }
    p
}

/// Whether a rename over a file of `file_uid` in a folder of `dir_mode`/`dir_uid` fails for user
/// `me`: in a folder with the sticky bit only the file's owner, the folder's owner or root may.
fn sticky_forbids_replacing(dir_mode: u32, dir_uid: u32, file_uid: u32, me: u32) -> bool {
    dir_mode & 0o1000 != 0 && me != 0 && file_uid != me && dir_uid != me
}

/// Writes a file atomically: the bytes go to a temporary file beside `path`, which is then renamed,
/// so a reader never sees a partial file and a failure leaves nothing behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    check_replaceable(path)?;
    let target = write_target(path);
    output_dir(&target)?;
    let tmp = hidden_sibling(&target, "tmp")?;
    let _cleanup = RemoveOnStop::new(&tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&mut f).with_context(|| format!("{}: cannot write", path.display()))?;
        f.sync_all().with_context(|| format!("{}: cannot flush", tmp.display()))?;
        std::fs::rename(&tmp, &target).with_context(|| format!("{}: cannot rename into place", target.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes several files as one: every file goes to a temporary beside its place (folders are
/// created; a link is written through), and only when all are written are they renamed into
/// place. A failure while writing (a full disk, a folder that cannot be made) leaves none of them
/// and no temporary; only a failure among the renames themselves leaves some files replaced.
pub fn write_files_atomic(files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    // (temporary, place, where a file already in the place is set aside)
    let mut staged: Vec<(PathBuf, PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let mut _cleanup = Vec::with_capacity(files.len());
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for (given, bytes) in files {
            check_replaceable(given)?;
            let path = &write_target(given);
            let dir = folder_of(path);
            // The folders made here, deepest last, removed again on failure.
            let missing: Vec<PathBuf> = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
            for d in missing.into_iter().rev() {
                _cleanup.push(RemoveOnStop::new(&d));
                made.push(d);
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
            let tmp = hidden_sibling(path, "tmp")?;
            _cleanup.push(RemoveOnStop::new(&tmp));
            staged.push((tmp.clone(), path.clone(), hidden_sibling(path, "old")?));
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
            std::io::Write::write_all(&mut f, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
            f.sync_all().with_context(|| format!("{}: cannot flush", tmp.display()))?;
        }
        Ok(())
    })();
    // On failure: no temporary, and no folder made here.
    let undo = || {
        for (tmp, ..) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        for d in made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    };
    if let Err(e) = result {
        undo();
        return Err(e);
    }
    // The renames, held from a stop signal: files already there are first moved aside, so a
    // rename that fails puts every file back as it was.
    with_stops_held(|| {
        let mut done: Vec<(&Path, Option<&PathBuf>)> = Vec::with_capacity(staged.len());
        for (tmp, path, old) in &staged {
            let aside = if path.exists() { std::fs::rename(path, old).map(|()| Some(old)) } else { Ok(None) };
            let moved = aside.and_then(|aside| match std::fs::rename(tmp, path) {
                Ok(()) => Ok(aside),
                Err(e) => {
                    if let Some(old) = aside {
                        let _ = std::fs::rename(old, path);
                    }
                    Err(e)
                }
            });
            match moved {
                Ok(aside) => done.push((path, aside)),
                Err(e) => {
                    for (path, aside) in done.iter().rev() {
                        let _ = match aside {
                            Some(old) => std::fs::rename(old, path),
                            None => std::fs::remove_file(path),
                        };
                    }
                    undo();
                    return Err(e).with_context(|| format!("{}: cannot rename into place", path.display()));
                }
            }
        }
        for (_, aside) in done {
            if let Some(old) = aside {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    })
}

/// The same safetensors file with its header's keys in sorted order. The safetensors crate writes
/// the metadata map in hash order, so the same tensors and metadata gave different bytes at each
/// run (no checksum pinning, no byte comparison of outputs); offsets are relative to the data, so
/// only the header changes.
pub fn sorted_safetensors_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use serde_json::Value;
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: std::collections::BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
            x => x,
        }
    }
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize).context("safetensors bytes shorter than their header length")?;
    let header_end = 8usize.checked_add(n).filter(|&e| e <= bytes.len()).context("safetensors header past the end")?;
    let header: Value = serde_json::from_slice(&bytes[8..header_end]).context("safetensors header is not JSON")?;
    let mut text = serde_json::to_string(&sorted(header))?;
    // The data stays 8-byte aligned, as the crate pads it.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - header_end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[header_end..]);
    Ok(out)
}

/// A tiny deterministic generator for random test data and weights (no cryptographic use).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn fill_uniform(&mut self, v: &mut [f32], lo: f32, hi: f32) {
        for x in v {
            *x = lo + (hi - lo) * self.uniform() as f32;
        }
    }
}

/// Calls `f` with every file under `dir` (its path and metadata), in name order, following
/// symlinks (git-annex / DataLad datasets link every chunk) at most `max_depth` folders deep.
/// A folder reached twice (a link loop, or two links to one folder) is walked once.
pub fn walk_files(dir: &Path, max_depth: u32, mut f: impl FnMut(&Path, &std::fs::Metadata)) {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, depth: u32, max_depth: u32, seen: &mut std::collections::HashSet<(u64, u64)>, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
        let Ok(m) = std::fs::metadata(dir) else { return };
        if !seen.insert((m.dev(), m.ino())) {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {
                    if depth < max_depth {
                        walk(&p, depth + 1, max_depth, seen, f)
                    }
                }
                Ok(m) => f(&p, &m),
                Err(_) => {}
            }
        }
    }
    walk(dir, 0, max_depth, &mut std::collections::HashSet::new(), &mut f);
}

/// What identifies a tomogram's bytes without reading them: the size and modification time of
/// its file, or of every file of its store (a re-exported tomogram at the same path differs),
/// and of its group's metadata when it is an array inside a zarr group (`tomo.zarr/0`: the
/// voxel size and axes are read there).
pub fn source_stamp(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    let mut add = |p: &Path, m: &std::fs::Metadata| {
        let rel = p.strip_prefix(path).unwrap_or(p);
        h.update(format!("{}\0{}\0{}.{}\n", rel.display(), m.len(), m.mtime(), m.mtime_nsec()));
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => walk_files(path, 8, &mut add),
        Ok(m) => add(path, &m),
        Err(_) => return String::new(),
    }
    if let Some(group) = path.parent().filter(|_| path.is_dir()) {
        for name in [".zattrs", ".zgroup", "zarr.json"] {
            let file = group.join(name);
            if let Ok(m) = std::fs::metadata(&file) {
                add(&file, &m);
            }
        }
    }
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    #[test]
    fn link_loops_are_walked_once_and_stamps_change_with_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("store");
        std::fs::create_dir_all(d.join("0")).unwrap();
        std::fs::write(d.join("0/a"), b"12").unwrap();
        std::fs::write(d.join(".zarray"), b"{}").unwrap();
        for k in 0..6 {
            std::os::unix::fs::symlink(".", d.join(format!("loop{k}"))).unwrap();
        }
        let mut files = Vec::new();
        walk_files(&d, 8, |p, _| files.push(p.strip_prefix(&d).unwrap().to_path_buf()));
        assert_eq!(files, [PathBuf::from(".zarray"), PathBuf::from("0/a")]);
        let before = source_stamp(&d);
        assert_eq!(before, source_stamp(&d));
        std::fs::write(d.join("0/a"), b"123").unwrap();
        assert_ne!(before, source_stamp(&d));
        // An array inside a group: the group's metadata counts too.
        let array = d.join("0");
        let before = source_stamp(&array);
        std::fs::write(d.join(".zattrs"), b"{\"multiscales\": []}").unwrap();
        assert_ne!(before, source_stamp(&array));
        let f = d.join("0/a");
        assert_ne!(source_stamp(&f), "");
        assert_eq!(source_stamp(&tmp.path().join("missing")), "");
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_other_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let mine = hidden_sibling(&d.path().join("a.csv"), "tmp").unwrap();
        for n in [".a.csv.17.tmp", ".b.json.18.tmp", ".a.csv.x.tmp", "a.csv.19.tmp", ".a.csv.20.old", ".a.csv..tmp"] {
            std::fs::write(d.path().join(n), "").unwrap();
        }
        std::fs::write(&mine, "").unwrap();
        std::fs::create_dir(d.path().join(".c.csv.21.tmp")).unwrap();
        // One name: only its temporaries of other processes.
        assert_eq!(remove_stale_temporaries(d.path(), Some(std::ffi::OsStr::new("a.csv"))), 1);
        assert!(!d.path().join(".a.csv.17.tmp").exists() && d.path().join(".b.json.18.tmp").exists());
        // Every name: never this process's own, a folder, or names not of the pattern.
        assert_eq!(remove_stale_temporaries(d.path(), None), 1);
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut expected: Vec<String> = [".a.csv.x.tmp", "a.csv.19.tmp", ".a.csv.20.old", ".a.csv..tmp", ".c.csv.21.tmp"].map(String::from).to_vec();
        expected.push(mine.file_name().unwrap().to_string_lossy().into_owned());
        expected.sort();
        assert_eq!(left, expected);
    }

    fn put(path: &Path, text: &str) -> Result<()> {
        write_atomic(path, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }

    #[test]
    fn writes_through_links_and_never_over_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        // A link to a file (relative) and a dangling one: the link stays, the target gets the bytes.
        std::fs::write(shared.join("sub.csv"), "old").unwrap();
        std::os::unix::fs::symlink("shared/sub.csv", tmp.path().join("link.csv")).unwrap();
        put(&tmp.path().join("link.csv"), "new").unwrap();
        assert!(tmp.path().join("link.csv").is_symlink());
        assert_eq!(std::fs::read_to_string(shared.join("sub.csv")).unwrap(), "new");
        std::os::unix::fs::symlink(shared.join("later.csv"), tmp.path().join("dangling.csv")).unwrap();
        check_output_file(&tmp.path().join("dangling.csv")).unwrap();
        put(&tmp.path().join("dangling.csv"), "x").unwrap();
        assert_eq!(std::fs::read_to_string(shared.join("later.csv")).unwrap(), "x");
        // An output that is an input under another name, or through a link, or inside one.
        let w = shared.join("w.safetensors");
        std::fs::write(&w, "weights").unwrap();
        std::os::unix::fs::symlink(&w, tmp.path().join("w_link")).unwrap();
        for out in [tmp.path().join("shared/../shared/w.safetensors"), tmp.path().join("w_link")] {
            let e = format!("{:#}", check_not_an_input(&out, &[&w]).unwrap_err());
            assert!(e.contains("is also an input"), "{e}");
        }
        let e = format!("{:#}", check_not_an_input(&shared.join("a/b.csv"), &[&shared]).unwrap_err());
        assert!(e.contains("lies inside the input"), "{e}");
        check_not_an_input(&tmp.path().join("out.csv"), &[&w, &shared]).unwrap();
        assert_eq!(std::fs::read_to_string(&w).unwrap(), "weights");
        let left: Vec<_> = std::fs::read_dir(&shared).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().ends_with(".tmp")).collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_failed_rename_puts_every_file_back() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("one.json"), "old one").unwrap();
        std::fs::write(d.join("three.json"), "old three").unwrap();
        // The third file's old copy cannot be set aside (a folder that is not empty holds that
        // name), so the renames fail there, after the first two were made.
        let aside = hidden_sibling(&d.join("three.json"), "old").unwrap();
        std::fs::create_dir_all(aside.join("x")).unwrap();
        // A folder in a place is refused before anything is written.
        std::fs::create_dir_all(d.join("four.json/x")).unwrap();
        let e = format!("{:#}", write_files_atomic(&[(d.join("four.json"), b"4".to_vec())]).unwrap_err());
        assert!(e.contains("four.json: is a directory"), "{e}");
        std::fs::remove_dir_all(d.join("four.json")).unwrap();
        let files = vec![
            (d.join("one.json"), b"new one".to_vec()),
            (d.join("new/two.json"), b"new two".to_vec()),
            (d.join("three.json"), b"new three".to_vec()),
        ];
        let e = format!("{:#}", write_files_atomic(&files).unwrap_err());
        assert!(e.contains("three.json: cannot rename into place"), "{e}");
        assert_eq!(std::fs::read_to_string(d.join("one.json")).unwrap(), "old one");
        assert_eq!(std::fs::read_to_string(d.join("three.json")).unwrap(), "old three");
        std::fs::remove_dir_all(&aside).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
        names.sort();
        assert_eq!(names, ["one.json", "three.json"], "new files, folders, temporaries or set-aside copies left");
    }

    #[test]
    fn devices_pipes_and_link_loops_are_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let e = format!("{:#}", check_output_file(Path::new("/dev/null")).unwrap_err());
        assert!(e.contains("not a plain file"), "{e}");
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(check_output_file(&fifo).is_err());
        assert!(put(&fifo, "x").is_err());
        let p = tmp.path();
        std::os::unix::fs::symlink("b", p.join("a")).unwrap();
        std::os::unix::fs::symlink("a", p.join("b")).unwrap();
        let e = format!("{:#}", check_output_file(&p.join("a")).unwrap_err());
        assert!(e.contains("loop of symbolic links"), "{e}");
    }

    #[test]
    fn sticky_folders_keep_other_users_files() {
        // /tmp-like (root's, 1777): another user's file cannot be replaced; one's own can.
        assert!(sticky_forbids_replacing(0o41777, 0, 1001, 1000));
        assert!(!sticky_forbids_replacing(0o41777, 0, 1000, 1000));
        // The folder's owner and root may; without the sticky bit anyone with write access may.
        assert!(!sticky_forbids_replacing(0o41777, 1000, 1001, 1000));
        assert!(!sticky_forbids_replacing(0o41777, 0, 1001, 0));
        assert!(!sticky_forbids_replacing(0o40777, 0, 1001, 1000));
    }

    #[test]
    fn files_written_together_leave_nothing_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("blocker"), "").unwrap();
        let files = vec![(d.join("a/b/one.json"), b"1".to_vec()), (d.join("blocker/two.json"), b"2".to_vec())];
        let e = format!("{:#}", write_files_atomic(&files).unwrap_err());
        assert!(e.contains("blocker") && e.contains("cannot create the directory"), "{e}");
        let mut names: Vec<_> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
        names.sort();
        assert_eq!(names, ["blocker"], "the folders made for the first file are removed again");
        let files = vec![(d.join("a/b/one.json"), b"1".to_vec()), (d.join("c/two.json"), b"2".to_vec())];
        write_files_atomic(&files).unwrap();
        assert_eq!(std::fs::read(d.join("a/b/one.json")).unwrap(), b"1");
        assert_eq!(std::fs::read(d.join("c/two.json")).unwrap(), b"2");
    }
}
