//! The CUDA kernel sources (`kernels/*.cu`), embedded in the binary so that a release build can
//! compile them with NVRTC for the device's own architecture at first use.

/// `(file name, source)` for every file in `kernels/`, one per op family, each with
/// `kernels/common.cuh` (shared device helpers) in front.
pub const SOURCES: &[(&str, &str)] = &[
    ("activation.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/activation.cu"))),
    ("blend.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/blend.cu"))),
    ("conv3d.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/conv3d.cu"))),
    ("conv_first.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/conv_first.cu"))),
    ("conv_tc.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/conv_tc.cu"))),
    ("convt.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/convt.cu"))),
    ("ensemble.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/ensemble.cu"))),
    ("heads.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/heads.cu"))),
    ("layout.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/layout.cu"))),
    ("nms.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/nms.cu"))),
    ("norm.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/norm.cu"))),
    ("resample.cu", concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/resample.cu"))),
];

/// The source of `kernels/<name>` (e.g. `"norm.cu"`).
pub fn source(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Names of the `extern "C" __global__ void NAME(` kernels defined in `source`, in source order.
/// Launch bounds and line breaks between the parts are allowed
/// (`extern "C" __global__ void __launch_bounds__(256)\nNAME(`); comments are skipped.
pub fn kernel_names(source: &str) -> Vec<String> {
    kernel_signatures(source).into_iter().map(|(name, _)| name).collect()
}

/// The C type class of one kernel parameter, as the launcher must pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Any pointer (`T*`, `const T* __restrict__`, `T* const*`): a 64-bit device address.
    Ptr,
    /// `int`
    I32,
    /// `long long`
    I64,
    /// `unsigned` / `unsigned int`
    U32,
    /// `float`
    F32,
}

impl ParamKind {
    fn parse(param: &str) -> Option<ParamKind> {
        if param.contains('*') {
            return Some(ParamKind::Ptr);
        }
        let words: Vec<&str> = param
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty() && !matches!(*w, "const" | "__restrict__" | "volatile"))
            .collect();
        // The last word is the parameter name.
        let ty = &words[..words.len().saturating_sub(1)];
        match ty {
            ["long", "long"] | ["long", "long", "int"] | ["int64_t"] => Some(ParamKind::I64),
            ["unsigned"] | ["unsigned", "int"] | ["uint32_t"] => Some(ParamKind::U32),
            ["int"] | ["int32_t"] => Some(ParamKind::I32),
            ["float"] => Some(ParamKind::F32),
            _ => None,
        }
    }
}

/// `(name, parameter kinds)` of every `extern "C"` kernel in `source`, in source order. A
/// parameter of a type the launcher does not know makes the whole list `None` for that kernel.
pub fn kernel_signatures(source: &str) -> Vec<(String, Option<Vec<ParamKind>>)> {
    kernel_params(source)
        .into_iter()
        .map(|(name, params)| (name, params.iter().map(|p| ParamKind::parse(p)).collect()))
        .collect()
}

/// How a pointer parameter is qualified: `__restrict__`, and `const` data (`const T*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtrQual {
    pub restrict: bool,
    pub const_data: bool,
}

/// Per kernel of `source`, each parameter's pointer qualifiers (`None` for a non-pointer).
pub fn pointer_qualifiers(source: &str) -> Vec<(String, Vec<Option<PtrQual>>)> {
    kernel_params(source)
        .into_iter()
        .map(|(name, params)| {
            let quals = params
                .iter()
                .map(|p| {
                    let star = p.find('*')?;
                    let const_data = p[..star].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == "const");
                    Some(PtrQual { restrict: p.contains("__restrict__"), const_data })
                })
                .collect();
            (name, quals)
        })
        .collect()
}

/// The pointer qualifiers of every kernel in `SOURCES`, by kernel name.
pub fn all_pointer_qualifiers() -> &'static std::collections::HashMap<String, Vec<Option<PtrQual>>> {
    static ALL: std::sync::OnceLock<std::collections::HashMap<String, Vec<Option<PtrQual>>>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| SOURCES.iter().flat_map(|(_, src)| pointer_qualifiers(src)).collect())
}

/// `(name, parameter texts)` of every `extern "C" __global__` kernel in `source` (no parameters:
/// an empty list).
fn kernel_params(source: &str) -> Vec<(String, Vec<String>)> {
    let code = strip_comments(source);
    let mut out = Vec::new();
    let mut rest = code.as_str();
    const HEAD: &str = "extern \"C\"";
    while let Some(i) = rest.find(HEAD) {
        rest = &rest[i + HEAD.len()..];
        let mut toks = Tokens(rest);
        if toks.next_ident() != Some("__global__") || toks.next_ident() != Some("void") {
            continue;
        }
        let mut name = toks.next_ident();
        if name == Some("__launch_bounds__") {
            if !toks.skip_parens() {
                continue;
            }
            name = toks.next_ident();
        }
        let Some(name) = name else { continue };
        let Some(params) = toks.paren_contents() else { continue };
        let list = if params.trim().is_empty() || params.trim() == "void" { Vec::new() } else { params.split(',').map(str::to_string).collect() };
        out.push((name.to_string(), list));
    }
    out
}

/// Removes `//` and `/* */` comments (string literals in kernels are not expected).
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '/' && it.peek() == Some(&'/') {
            for c in it.by_ref() {
                if c == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else if c == '/' && it.peek() == Some(&'*') {
            it.next();
            let mut prev = ' ';
            for c in it.by_ref() {
                if prev == '*' && c == '/' {
                    break;
                }
                prev = c;
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// A tiny cursor over C tokens: identifiers and balanced parentheses.
struct Tokens<'a>(&'a str);

impl<'a> Tokens<'a> {
    fn skip_ws(&mut self) {
        self.0 = self.0.trim_start();
    }

    fn peek_char(&mut self) -> Option<char> {
        self.skip_ws();
        self.0.chars().next()
    }

    fn next_ident(&mut self) -> Option<&'a str> {
        self.skip_ws();
        let end = self.0.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(self.0.len());
        if end == 0 {
            return None;
        }
        let (id, rest) = self.0.split_at(end);
        self.0 = rest;
        Some(id)
    }

    /// The text inside the next `( ... )` (nested), consuming it; None when the next token is not
    /// `(` or it never closes.
    fn paren_contents(&mut self) -> Option<&'a str> {
        if self.peek_char() != Some('(') {
            return None;
        }
        let start = self.0;
        if !self.skip_parens() {
            return None;
        }
        let used = start.len() - self.0.len();
        Some(&start[1..used - 1])
    }

    /// Skips `( ... )` (nested); false when the next token is not `(` or it never closes.
    fn skip_parens(&mut self) -> bool {
        if self.peek_char() != Some('(') {
            return false;
        }
        let mut depth = 0usize;
        for (i, c) in self.0.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        self.0 = &self.0[i + 1..];
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_qualifiers_read_restrict_and_const_data() {
        let src = "extern \"C\" __global__ void k(const __half* __restrict__ x, __half* y, float* __restrict__ s, const float* b, int n) {}";
        let q = |restrict, const_data| Some(PtrQual { restrict, const_data });
        assert_eq!(pointer_qualifiers(src), vec![("k".to_string(), vec![q(true, true), q(false, false), q(true, false), q(false, true), None])]);
        // Every kernel of the sources has its entry.
        for (_, src) in SOURCES {
            for name in kernel_names(src) {
                assert!(all_pointer_qualifiers().contains_key(&name), "{name}");
            }
        }
    }

    #[test]
    fn parses_plain_and_launch_bounds_kernels() {
        let src = r#"
            // extern "C" __global__ void commented_out(int x) {}
            /* extern "C" __global__ void also_commented(int x) {} */
            extern "C" __global__ void plain(float* a, int n) {}
            extern "C" __global__ void __launch_bounds__(NORM_THREADS * (2))
            bounded (const float* x) {}
            extern "C" __device__ float helper(float x) { return x; }
            __global__ void not_extern_c(int) {}
            extern "C" __global__ void
                split_lines(int n) {}
        "#;
        assert_eq!(kernel_names(src), vec!["plain", "bounded", "split_lines"]);
    }

    #[test]
    fn every_kernel_file_is_embedded_and_has_kernels() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = SOURCES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(embedded, on_disk, "kernels/*.cu and SOURCES differ");
        let mut all = Vec::new();
        for (name, src) in SOURCES {
            let k = kernel_names(src);
            assert!(!k.is_empty(), "{name} defines no extern \"C\" kernel");
            assert!(src.contains("CPU twin"), "{name} does not name its CPU twin");
            all.extend(k);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "kernel names must be unique across files");
        assert_eq!(source("norm.cu").map(kernel_names).unwrap(), vec!["norm_stats_partial", "norm_finalize", "norm_finalize_tiles", "norm_apply"]);
    }

    #[test]
    fn every_kernel_signature_parses() {
        use ParamKind::*;
        for (file, src) in SOURCES {
            let sigs = kernel_signatures(src);
            let names: Vec<String> = sigs.iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(names, kernel_names(src), "{file}");
            for (n, k) in &sigs {
                assert!(k.is_some(), "{file}: {n} has a parameter type the launcher does not know");
            }
        }
        let norm = kernel_signatures(source("norm.cu").unwrap());
        assert_eq!(norm[0].1.as_deref(), Some(&[Ptr, I64, I32, I32, I32, F32, Ptr][..]));
        let ens = kernel_signatures(source("ensemble.cu").unwrap());
        let mean = ens.iter().find(|(n, _)| n == "ensemble_mean_f32").unwrap();
        assert_eq!(mean.1.as_deref(), Some(&[Ptr, Ptr, I32, I64, F32][..]));
        let nms = kernel_signatures(source("nms.cu").unwrap());
        let write = nms.iter().find(|(n, _)| n == "nms_write").unwrap();
        assert_eq!(write.1.as_deref(), Some(&[Ptr, I32, I32, I32, Ptr, Ptr, U32, Ptr, Ptr][..]));
        assert_eq!(kernel_signatures("extern \"C\" __global__ void k(double x) {}")[0].1, None);
    }
}
