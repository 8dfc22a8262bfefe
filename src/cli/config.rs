//! `fastdet run --config run.toml`: every run option in one TOML file. The file's values become
//! command-line arguments, except those the command line gives itself (flags override the file).

use anyhow::{bail, Context, Result};
use fastdet::particles::{class_index, CLASSES, SEED_THRESHOLDS};
use std::ffi::OsString;
use std::path::Path;

/// Options whose values are paths: relative paths in a config file are relative to the file.
const PATH_KEYS: &[&str] = &["data", "copick-config", "zarr", "mrc", "weights", "out", "copick-out", "save-maps", "star-out", "qc"];
/// Options that take several values after one flag.
const MULTI_KEYS: &[&str] = &["weights", "mrc", "zarr"];

fn given(argv: &[OsString], flag: &str) -> bool {
    argv.iter().any(|a| {
        let a = a.to_string_lossy();
        // `-o FILE`, `-oFILE`, `-o=FILE` are --out (no other option has a short form).
        let short_out = flag == "--out" && a.starts_with("-o");
        a == flag || a.starts_with(&format!("{flag}=")) || short_out
    })
}

fn scalar(v: &toml::Value, key: &str, file: &Path) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        _ => bail!("{}: `{key}` must be a string or a number", file.display()),
    })
}

fn resolve(key: &str, value: String, base: &Path) -> String {
    if PATH_KEYS.contains(&key) && Path::new(&value).is_relative() {
        base.join(value).to_string_lossy().to_string()
    } else {
        value
    }
}

/// Thresholds given per class name (missing classes keep the seed value) or as a list.
fn thresholds(v: &toml::Value, file: &Path) -> Result<String> {
    let values: Vec<f64> = match v {
        toml::Value::Table(t) => {
            let mut out: Vec<f64> = SEED_THRESHOLDS.iter().map(|&x| x as f64).collect();
            for (name, val) in t {
                let c = class_index(name).with_context(|| {
                    format!("{}: unknown class {name:?} in [thresholds]; classes are {}", file.display(), class_names())
                })?;
                out[c] = val.as_float().or(val.as_integer().map(|i| i as f64)).with_context(|| format!("{}: threshold {name} is not a number", file.display()))?;
            }
            out
        }
        toml::Value::Array(a) => a
            .iter()
            .map(|x| x.as_float().or(x.as_integer().map(|i| i as f64)).with_context(|| format!("{}: thresholds must be numbers", file.display())))
            .collect::<Result<_>>()?,
        _ => bail!("{}: `thresholds` must be a table of class = value or a list", file.display()),
    };
    Ok(values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","))
}

fn class_names() -> String {
    CLASSES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// The true/false options a `--no-KEY` flag turns off, over a config file's `KEY = true`
/// (`--no-host-blend` is `--device-blend`).
const NEGATABLE: &[&str] = &["allow-nonfinite", "with-score", "resume", "resample", "invert"];

/// The config file `expand` read and the options it turned into flags.
static FROM_FILE: std::sync::Mutex<Option<(std::path::PathBuf, Vec<String>)>> = std::sync::Mutex::new(None);

/// For an error that names an option whose value came from the config file: a line saying so
/// (the message names the flag, the user wrote a key in a file).
pub fn file_note(error: &str) -> Option<String> {
    let guard = FROM_FILE.lock().unwrap_or_else(|e| e.into_inner());
    let (file, flags) = guard.as_ref()?;
    // The longest flag named (--voxel-size, not --voxel-size's prefix of another).
    let named: Vec<&String> = flags.iter().filter(|f| error.contains(f.as_str()) && !error.contains(&format!("{f}-"))).collect();
    let shown: Vec<String> = named.iter().map(|f| format!("`{}`", f.trim_start_matches("--").replace('-', "_"))).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    (!shown.is_empty()).then(|| format!("note: the value of {} came from the config file {}", shown.join(", "), file.display()))
}

/// Expands `fastdet run --config FILE ...` into plain arguments.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).map(|a| a.to_string_lossy() != "run").unwrap_or(true) {
        return Ok(argv);
    }
    // `--no-KEY`: KEY off (its default), whatever the file says; gone before clap sees it.
    let negated_key = |a: &OsString| a.to_str().and_then(|s| s.strip_prefix("--no-")).filter(|k| NEGATABLE.contains(k)).map(str::to_owned);
    let negated: Vec<String> = argv.iter().filter_map(negated_key).collect();
    let argv: Vec<OsString> = argv
        .into_iter()
        .filter(|a| negated_key(a).is_none())
        .map(|a| if a == "--no-host-blend" { "--device-blend".into() } else { a })
        .collect();
    if let Some(k) = negated.iter().find(|k| given(&argv, &format!("--{k}"))) {
        bail!("--{k} and --no-{k} contradict each other");
    }
    let Some(pos) = argv.iter().position(|a| a == "--config" || a.to_string_lossy().starts_with("--config=")) else {
        return Ok(argv);
    };
    let arg = argv[pos].to_string_lossy().to_string();
    let (path, consumed) = match arg.strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (argv.get(pos + 1).context("--config needs a file")?.to_string_lossy().to_string(), 2),
    };
    let file = Path::new(&path);
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read config", file.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("{}: not valid TOML", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut rest: Vec<OsString> = argv[..pos].to_vec();
    rest.extend_from_slice(&argv[pos + consumed..]);
    let mut extra: Vec<OsString> = Vec::new();
    // Whether the file asks for blending on the host (from either key).
    let mut file_host: Option<bool> = None;
    let devices_in_file: Vec<&String> = table.keys().filter(|k| DEVICE_KEYS.contains(&k.replace('_', "-").as_str())).collect();
    if devices_in_file.len() > 1 {
        bail!("{}: give one of device, gpus and devices (the file has {})", file.display(), devices_in_file.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" and "));
    }
    // The device keys are one choice: the command line's, when it makes one, replaces the file's.
    let devices_on_command_line = DEVICE_KEYS.iter().any(|k| given(&rest, &format!("--{k}")));
    // So are the inputs: `--mrc` on the command line replaces the file's `data` (and the keys
    // that only apply to it).
    let input_on_command_line = INPUT_KEYS.iter().any(|k| given(&rest, &format!("--{k}")));
    // The file's split is kept for a `--data` given on the command line, and means nothing for
    // the other inputs (from the command line or the file).
    let other_input_on_command_line = INPUT_KEYS.iter().any(|k| *k != "data" && given(&rest, &format!("--{k}")));
    // Nor for the file's own other input (a file once written for `data`, its input changed).
    // (An empty list, which gives no flag, is no input.)
    let other_input_in_file = !input_on_command_line
        && table.iter().any(|(k, v)| k != "data" && INPUT_KEYS.contains(&k.replace('_', "-").as_str()) && v.as_array().is_none_or(|a| !a.is_empty()));
    for (raw_key, v) in &table {
        let key = raw_key.replace('_', "-");
        if !KNOWN.contains(&key.as_str()) {
            bail!("{}: unknown option `{raw_key}`; known: {}", file.display(), KNOWN.join(", "));
        }
        let flag = format!("--{key}");
        if given(&rest, &flag)
            || negated.contains(&key)
            || (devices_on_command_line && DEVICE_KEYS.contains(&key.as_str()))
            || (input_on_command_line && (INPUT_KEYS.contains(&key.as_str()) || INPUT_ONLY_KEYS.contains(&key.as_str())))
            || ((other_input_on_command_line || other_input_in_file) && key == "split")
        {
            continue; // the command line wins
        }
        check_kind(&key, raw_key, v, file)?;
        match (key.as_str(), v) {
            // Blending on the device is the default: the file can only turn it off, and the
            // command line's choice either way wins.
            ("device-blend" | "host-blend", toml::Value::Boolean(b)) => {
                let host = (key == "host-blend") == *b;
                if file_host.is_some_and(|h| h != host) {
                    bail!("{}: device_blend and host_blend contradict each other", file.display());
                }
                file_host = Some(host);
            }
            ("thresholds", v) => {
                extra.push(format!("{flag}={}", thresholds(v, file)?).into());
            }
            (_, toml::Value::Boolean(b)) => {
                if *b {
                    extra.push(flag.into());
                }
            }
            // An empty list (as `--print-config` writes for no weights) gives nothing.
            (_, toml::Value::Array(a)) if a.is_empty() => {}
            (k, toml::Value::Array(a)) if MULTI_KEYS.contains(&k) => {
                extra.push(flag.into());
                for x in a {
                    extra.push(resolve(k, scalar(x, raw_key, file)?, base).into());
                }
            }
            // `--flag=value`: a value starting with '-' is not taken for a flag.
            (k, toml::Value::Array(a)) => {
                let parts: Vec<String> = a.iter().map(|x| scalar(x, raw_key, file)).collect::<Result<_>>()?;
                extra.push(format!("{flag}={}", resolve(k, parts.join(","), base)).into());
            }
            (k, v) => {
                extra.push(format!("{flag}={}", resolve(k, scalar(v, raw_key, file)?, base)).into());
            }
        }
    }
    if file_host == Some(true) && !given(&rest, "--host-blend") && !given(&rest, "--device-blend") {
        extra.push("--host-blend".into());
    }
    // Remembered, so that an error about one of these options can say it came from the file.
    let flags: Vec<String> = extra.iter().filter_map(|a| a.to_str()).filter_map(|a| a.split('=').next()).filter(|f| f.starts_with("--")).map(str::to_owned).collect();
    *FROM_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some((file.to_path_buf(), flags));
    // File values go right after `run`, before the command line's own arguments.
    let mut out: Vec<OsString> = rest[..2].to_vec();
    out.extend(extra);
    out.extend_from_slice(&rest[2..]);
    Ok(out)
}

/// The keys that choose the devices (one of them at most).
const DEVICE_KEYS: &[&str] = &["device", "gpus", "devices"];
/// The keys that choose the tomograms, and those that apply to `data` only.
const INPUT_KEYS: &[&str] = &["data", "copick-config", "zarr", "mrc"];
const INPUT_ONLY_KEYS: &[&str] = &["runs", "tomogram"];

/// What each key's value must be, so that a wrong one is an error naming the file and the key.
fn check_kind(key: &str, raw_key: &str, v: &toml::Value, file: &Path) -> Result<()> {
    use toml::Value as V;
    let whole = |x: &V| matches!(x, V::Integer(i) if *i >= 0);
    let (ok, want) = match key {
        "allow-nonfinite" | "with-score" | "resume" | "device-blend" | "host-blend" | "resample" | "invert" => (v.is_bool(), "true or false"),
        "batch" | "top-k" => (whole(v), "a whole number >= 0"),
        "iou" | "blend-sigma" | "model-voxel-size" => (v.is_float() || v.is_integer(), "a number"),
        "voxel-size" => (v.is_float() || v.is_integer() || v.as_str() == Some("file"), "a number or \"file\""),
        "level" => (v.is_str() || whole(v), "a level name or number"),
        "window" | "tiles" | "gpus" => (
            v.is_str() || v.as_array().is_some_and(|a| a.iter().all(whole)),
            if key == "gpus" { "a list of GPU numbers, e.g. [0, 1]" } else { "a list of three whole numbers, e.g. [192, 128, 128]" },
        ),
        "runs" | "weights" | "mrc" | "zarr" | "devices" => (v.is_str() || v.as_array().is_some_and(|a| a.iter().all(|x| x.is_str())), "a list of strings"),
        "thresholds" => (true, ""),
        // `session_id = 0`, `split = 2024`: ids written as numbers are fine.
        "user-id" | "session-id" | "split" => (v.is_str() || v.is_integer(), "a string"),
        _ => (v.is_str(), "a string"),
    };
    if !ok {
        bail!("{}: `{raw_key}` must be {want}, not {v}", file.display());
    }
    Ok(())
}

/// Every option `run` accepts in a config file.
const KNOWN: &[&str] = &[
    "data", "split", "copick-config", "tomogram", "runs", "zarr", "mrc", "level", "weights", "device", "gpus", "devices", "window", "tiles", "iou", "top-k", "blend-sigma",
    "tta", "batch", "device-blend", "host-blend", "shard", "voxel-size", "resample", "model-voxel-size", "invert", "allow-nonfinite", "pad", "out", "thresholds", "with-score", "copick-out", "user-id",
    "session-id", "save-maps", "resume", "star-out", "qc",
];
