//! A data-only unpickler for PyTorch checkpoints.
//!
//! `torch.save` writes a zip holding `data.pkl` and one raw file per storage. The pickle is a small
//! program; we *interpret* it into a tree of [`Value`]s and never execute anything: `GLOBAL` becomes a
//! name, `REDUCE`/`NEWOBJ`/`BUILD` become [`Object`] records. The only calls we recognise are the
//! tensor rebuilders, which become [`TensorRef`]s pointing at a storage key.

use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Element type of a storage, from its `torch.*Storage` class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A tensor as the pickle describes it: a view into a storage file of the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub dtype: StorageDtype,
    /// Number of elements the pickle says the storage holds.
    pub storage_numel: usize,
    /// Offset in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A call or instantiation we did not run: kept as data.
#[derive(Debug)]
pub struct Object {
    pub module: String,
    pub name: String,
    pub args: Value,
    /// Items added by SETITEM(S) (e.g. an `OrderedDict`).
    pub items: Vec<(Value, Value)>,
    /// Items added by APPEND(S).
    pub list: Vec<Value>,
    /// Argument of BUILD.
    pub state: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Rc<(String, String)>),
    Object(Rc<RefCell<Object>>),
    /// The id a BINPERSID/PERSID refers to (for torch: the storage tuple).
    PersId(Rc<Value>),
    Tensor(Rc<TensorRef>),
    /// Stack marker; never escapes the interpreter.
    Mark,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Key/value pairs of a dict or of a dict-like object (`OrderedDict`, Lightning's `AttributeDict`).
    pub fn dict_items(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.borrow().clone()),
            Value::Object(o) => {
                let o = o.borrow();
                if o.items.is_empty() && o.list.is_empty() && o.state.is_none() && o.name.ends_with("Dict") {
                    return Some(Vec::new());
                }
                if o.items.is_empty() {
                    None
                } else {
                    Some(o.items.clone())
                }
            }
            _ => None,
        }
    }

    /// Looks a string key up in a dict-like value.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.dict_items()?.into_iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }
}

fn tuple_items(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Tuple(t) => Some(t.as_ref().clone()),
        Value::List(l) => Some(l.borrow().clone()),
        _ => None,
    }
}

fn usize_list(v: &Value, what: &str) -> Result<Vec<usize>> {
    let items = tuple_items(v).with_context(|| format!("tensor {what} is not a tuple"))?;
    items
        .iter()
        .map(|x| match x.as_int() {
            Some(i) if i >= 0 => Ok(i as usize),
            _ => bail!("tensor {what} holds a non-integer or negative value"),
        })
        .collect()
}

/// Turns a torch storage persistent id `('storage', torch.FloatStorage, key, location, numel)` and the
/// arguments of `_rebuild_tensor_v2(storage, offset, size, stride, ...)` into a [`TensorRef`].
fn rebuild_tensor(args: &Value) -> Result<TensorRef> {
    let a = tuple_items(args).context("_rebuild_tensor_v2 arguments are not a tuple")?;
    if a.len() < 4 {
        bail!("_rebuild_tensor_v2 takes at least 4 arguments, got {}", a.len());
    }
    let pid = match &a[0] {
        Value::PersId(p) => p.as_ref().clone(),
        _ => bail!("tensor storage is not a persistent id"),
    };
    let p = tuple_items(&pid).context("storage id is not a tuple")?;
    if p.len() < 5 || p[0].as_str() != Some("storage") {
        bail!("storage id is not ('storage', type, key, location, numel)");
    }
    let dtype = match &p[1] {
        Value::Global(g) => StorageDtype::from_class(&g.1).with_context(|| format!("unsupported storage type {}.{}", g.0, g.1))?,
        _ => bail!("storage type is not a class name"),
    };
    let storage_key = match &p[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => bail!("storage key is not a string"),
    };
    let storage_numel = p[4].as_int().filter(|n| *n >= 0).context("storage size is not a non-negative integer")? as usize;
    let offset = a[1].as_int().filter(|n| *n >= 0).context("tensor offset is not a non-negative integer")? as usize;
    let shape = usize_list(&a[2], "size")?;
    let stride = usize_list(&a[3], "stride")?;
    if shape.len() != stride.len() {
        bail!("tensor size has {} dims but stride has {}", shape.len(), stride.len());
    }
    Ok(TensorRef { storage_key, dtype, storage_numel, offset, shape, stride })
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            bail!("pickle is truncated at byte {}", self.pos);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').context("pickle is truncated inside a text line")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).context("pickle text line is not UTF-8")
    }
    fn len_prefixed(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).context("pickle length does not fit in memory")?;
        self.take(n)
    }
}

fn utf8(b: &[u8]) -> Result<String> {
    String::from_utf8(b.to_vec()).context("pickle string is not UTF-8")
}

fn long_from_le(b: &[u8]) -> Result<i64> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 8 {
        bail!("pickle integer of {} bytes does not fit in 64 bits", b.len());
    }
    let mut buf = if b[b.len() - 1] & 0x80 != 0 { [0xffu8; 8] } else { [0u8; 8] };
    buf[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(buf))
}

/// Deepest nesting of containers a pickle may build. Dropping a [`Value`] recurses once per level,
/// so an unbounded depth (one byte per level, e.g. repeated TUPLE1) would overflow the stack; a
/// pickle written by Python's pickler cannot nest deeper than its recursion limit (1000) anyway.
pub const MAX_NESTING: usize = 1000;

/// Bytes of strings a pickle may hold in all, per byte of pickle (plus [`MIN_COPY_BUDGET`]).
/// DUP, memo PUT and GET copy a string or bytes value whole, so without a bound a few bytes of
/// opcodes could fill memory with copies of one long string.
const COPY_FACTOR: usize = 64;
const MIN_COPY_BUDGET: usize = 64 << 20;

/// The interpreter's stack. Every container pushed is also kept in `arena` until the interpreter is
/// done, so no container is freed (and its children dropped recursively) mid-run; at the end
/// everything is taken apart iteratively by [`dismantle`]. `copied` counts the bytes of every
/// string and bytes value pushed or memoised.
struct Stack {
    items: Vec<Value>,
    arena: Vec<Value>,
    copied: usize,
}

fn text_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => s.len(),
        Value::Bytes(b) => b.len(),
        _ => 0,
    }
}

impl Stack {
    fn push(&mut self, v: Value) {
        if matches!(v, Value::Tuple(_) | Value::List(_) | Value::Dict(_) | Value::Object(_) | Value::PersId(_)) {
            self.arena.push(v.clone());
        }
        self.copied = self.copied.saturating_add(text_len(&v));
        self.items.push(v);
    }

    /// A copy of the top value for the memo.
    fn memo_copy(&mut self) -> Result<Value> {
        let v = match self.items.last() {
            Some(Value::Mark) | None => bail!("pickle stack underflow"),
            Some(v) => v.clone(),
        };
        self.copied = self.copied.saturating_add(text_len(&v));
        Ok(v)
    }
}

impl std::ops::Deref for Stack {
    type Target = Vec<Value>;
    fn deref(&self) -> &Vec<Value> {
        &self.items
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Vec<Value> {
        &mut self.items
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut work = std::mem::take(&mut self.arena);
        work.append(&mut self.items);
        dismantle(work);
    }
}

/// Drops values without recursing: a container no one else holds gives up its children to the
/// work list before it is freed (one still shared elsewhere only loses a reference).
fn dismantle(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        match v {
            Value::Tuple(t) => work.extend(Rc::try_unwrap(t).unwrap_or_default()),
            Value::List(l) => work.extend(Rc::try_unwrap(l).map(RefCell::into_inner).unwrap_or_default()),
            Value::Dict(d) => {
                let d = Rc::try_unwrap(d).map(RefCell::into_inner).unwrap_or_default();
                work.extend(d.into_iter().flat_map(|(k, v)| [k, v]));
            }
            Value::Object(o) => {
                if let Ok(o) = Rc::try_unwrap(o) {
                    let o = o.into_inner();
                    work.push(o.args);
                    work.extend(o.items.into_iter().flat_map(|(k, v)| [k, v]));
                    work.extend(o.list);
                    work.extend(o.state);
                }
            }
            Value::PersId(p) => work.extend(Rc::try_unwrap(p).ok()),
            _ => {}
        }
    }
}

/// The values a container holds, and its identity; `None` for a leaf.
fn children(v: &Value) -> Option<(usize, Vec<Value>)> {
    let pairs = |kv: &[(Value, Value)]| kv.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect::<Vec<_>>();
    Some(match v {
        Value::Tuple(t) => (Rc::as_ptr(t) as *const () as usize, t.to_vec()),
        Value::List(l) => (Rc::as_ptr(l) as *const () as usize, l.borrow().clone()),
        Value::Dict(d) => (Rc::as_ptr(d) as *const () as usize, pairs(&d.borrow())),
        Value::Object(o) => {
            let id = Rc::as_ptr(o) as *const () as usize;
            let o = o.borrow();
            let mut c = vec![o.args.clone()];
            c.extend(pairs(&o.items));
            c.extend(o.list.iter().cloned());
            c.extend(o.state.clone());
            (id, c)
        }
        Value::PersId(p) => (Rc::as_ptr(p) as *const () as usize, vec![p.as_ref().clone()]),
        _ => return None,
    })
}

/// How deep dropping `v` can recurse: the longest chain of nested containers below it (a leaf is
/// 0), each shared container counted once, cycles cut (Rc never frees a cycle). Iterative; returns
/// `MAX_NESTING + 1` as soon as a deeper chain is seen.
fn nesting_depth(v: &Value) -> usize {
    let Some((id, ch)) = children(v) else { return 0 };
    let mut done: HashMap<usize, usize> = HashMap::new();
    let mut on_path = std::collections::HashSet::from([id]);
    // (container, its children, next child, deepest child so far)
    let mut path = vec![(id, ch, 0usize, 0usize)];
    loop {
        let top = path.last_mut().expect("path is never empty here");
        if let Some(c) = top.1.get(top.2).cloned() {
            top.2 += 1;
            let Some((cid, cch)) = children(&c) else { continue };
            if let Some(&d) = done.get(&cid) {
                top.3 = top.3.max(d);
            } else if !on_path.contains(&cid) {
                if path.len() >= MAX_NESTING {
                    return MAX_NESTING + 1;
                }
                on_path.insert(cid);
                path.push((cid, cch, 0, 0));
            }
        } else {
            let (id, _, _, deepest) = path.pop().expect("path is never empty here");
            on_path.remove(&id);
            done.insert(id, deepest + 1);
            match path.last_mut() {
                Some(parent) => parent.3 = parent.3.max(deepest + 1),
                None => return deepest + 1,
            }
        }
    }
}

/// Interprets a pickle (protocols 0–5) into a [`Value`], executing nothing.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, pos: 0 };
    // Declared before `memo`, so dropped after it: while it is dismantled, nothing else holds values.
    let mut stack = Stack { items: Vec::new(), arena: Vec::new(), copied: 0 };
    let copy_budget = data.len().saturating_mul(COPY_FACTOR).saturating_add(MIN_COPY_BUDGET);
    let mut memo: HashMap<u64, Value> = HashMap::new();

    fn pop(stack: &mut Vec<Value>) -> Result<Value> {
        match stack.pop() {
            Some(Value::Mark) | None => bail!("pickle stack underflow"),
            Some(v) => Ok(v),
        }
    }
    fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>> {
        let at = stack.iter().rposition(|v| matches!(v, Value::Mark)).context("pickle MARK not found")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn top(stack: &mut [Value]) -> Result<&mut Value> {
        match stack.last_mut() {
            Some(Value::Mark) | None => bail!("pickle stack underflow"),
            Some(v) => Ok(v),
        }
    }
    fn set_items(target: &Value, pairs: Vec<Value>) -> Result<()> {
        if !pairs.len().is_multiple_of(2) {
            bail!("pickle SETITEMS with an odd number of values");
        }
        let mut it = pairs.into_iter();
        let mut kv = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            kv.push((k, v));
        }
        match target {
            Value::Dict(d) => d.borrow_mut().extend(kv),
            Value::Object(o) => o.borrow_mut().items.extend(kv),
            _ => bail!("pickle SETITEM on a value that is not a dict"),
        }
        Ok(())
    }
    fn append(target: &Value, items: Vec<Value>) -> Result<()> {
        match target {
            Value::List(l) => l.borrow_mut().extend(items),
            Value::Object(o) => o.borrow_mut().list.extend(items),
            _ => bail!("pickle APPEND on a value that is not a list"),
        }
        Ok(())
    }
    fn call(func: Value, args: Value) -> Result<Value> {
        let (module, name) = match &func {
            Value::Global(g) => (g.0.clone(), g.1.clone()),
            _ => ("".to_string(), "<call>".to_string()),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                Ok(Value::Tensor(Rc::new(rebuild_tensor(&args)?)))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                // nn.Parameter(data, requires_grad, hooks): the data is the tensor.
                let a = tuple_items(&args).context("_rebuild_parameter arguments are not a tuple")?;
                a.into_iter().next().context("_rebuild_parameter without data")
            }
            _ => Ok(Value::Object(Rc::new(RefCell::new(Object {
                module,
                name,
                args,
                items: Vec::new(),
                list: Vec::new(),
                state: None,
            })))),
        }
    }

    loop {
        if stack.copied > copy_budget {
            bail!("pickle copies strings into more than {copy_budget} bytes (it is {} bytes long)", data.len());
        }
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME
            }
            b'.' => {
                // STOP
                let v = pop(&mut stack)?;
                if nesting_depth(&v) > MAX_NESTING {
                    stack.arena.push(v); // dismantled with the stack, not dropped recursively
                    bail!("pickle nests values more than {MAX_NESTING} deep");
                }
                return Ok(v);
            }
            b'(' => stack.push(Value::Mark),
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let v = top(&mut stack)?.clone();
                stack.push(v);
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(r.take(4)?.try_into().unwrap()) as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'I' => {
                let l = r.line()?;
                stack.push(match l {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(l.trim().parse().with_context(|| format!("bad pickle INT {l:?}"))?),
                });
            }
            b'L' => {
                let l = r.line()?.trim_end_matches('L');
                stack.push(Value::Int(l.parse().with_context(|| format!("bad pickle LONG {l:?}"))?));
            }
            0x8a => {
                let n = r.u8()? as u64;
                stack.push(Value::Int(long_from_le(r.len_prefixed(n)?)?));
            }
            0x8b => {
                let n = r.u32()? as u64;
                stack.push(Value::Int(long_from_le(r.len_prefixed(n)?)?));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().unwrap()))),
            b'F' => {
                let l = r.line()?;
                stack.push(Value::Float(l.trim().parse().with_context(|| format!("bad pickle FLOAT {l:?}"))?));
            }
            b'X' => {
                let n = r.u32()? as u64;
                stack.push(Value::Str(utf8(r.len_prefixed(n)?)?));
            }
            0x8c => {
                let n = r.u8()? as u64;
                stack.push(Value::Str(utf8(r.len_prefixed(n)?)?));
            }
            0x8d => {
                let n = r.u64()?;
                stack.push(Value::Str(utf8(r.len_prefixed(n)?)?));
            }
            b'V' => stack.push(Value::Str(r.line()?.to_string())),
            b'S' => {
                let l = r.line()?;
                stack.push(Value::Str(l.trim_matches(|c| c == '\'' || c == '"').to_string()));
            }
            b'T' => {
                let n = r.u32()? as u64;
                stack.push(Value::Bytes(r.len_prefixed(n)?.to_vec()));
            }
            b'U' | b'C' => {
                let n = r.u8()? as u64;
                stack.push(Value::Bytes(r.len_prefixed(n)?.to_vec()));
            }
            b'B' => {
                let n = r.u32()? as u64;
                stack.push(Value::Bytes(r.len_prefixed(n)?.to_vec()));
            }
            0x8e | 0x96 => {
                let n = r.u64()?;
                stack.push(Value::Bytes(r.len_prefixed(n)?.to_vec()));
            }
            b')' => stack.push(Value::Tuple(Rc::new(Vec::new()))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let at = stack.len() - n;
                let items = stack.split_off(at);
                if items.iter().any(|v| matches!(v, Value::Mark)) {
                    bail!("pickle TUPLE over a MARK");
                }
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b']' => stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                let t = top(&mut stack)?.clone();
                append(&t, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                let t = top(&mut stack)?.clone();
                append(&t, items)?;
            }
            b'}' => stack.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                set_items(&d, items)?;
                stack.push(d);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                let t = top(&mut stack)?.clone();
                set_items(&t, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                let t = top(&mut stack)?.clone();
                set_items(&t, items)?;
            }
            0x8f => stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))), // EMPTY_SET as a list
            0x90 => {
                let items = pop_mark(&mut stack)?;
                let t = top(&mut stack)?.clone();
                append(&t, items)?;
            }
            0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(Rc::new((m, n)))),
                    _ => bail!("pickle STACK_GLOBAL without two strings"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(call(func, args)?);
            }
            0x81 => {
                let args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(call(cls, args)?);
            }
            0x92 => {
                let _kwargs = pop(&mut stack)?;
                let args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(call(cls, args)?);
            }
            b'i' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                let args = pop_mark(&mut stack)?;
                stack.push(call(Value::Global(Rc::new((module, name))), Value::Tuple(Rc::new(args)))?);
            }
            b'o' => {
                let mut items = pop_mark(&mut stack)?;
                if items.is_empty() {
                    bail!("pickle OBJ without a class");
                }
                let cls = items.remove(0);
                stack.push(call(cls, Value::Tuple(Rc::new(items)))?);
            }
            b'b' => {
                let state = pop(&mut stack)?;
                // BUILD on a tensor sets Python attributes only; on dicts it merges. Keep the target.
                if let Value::Object(o) = top(&mut stack)? {
                    o.borrow_mut().state = Some(state);
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Value::PersId(Rc::new(pid)));
            }
            b'P' => {
                let pid = r.line()?.to_string();
                stack.push(Value::PersId(Rc::new(Value::Str(pid))));
            }
            b'h' => {
                let k = r.u8()? as u64;
                stack.push(memo.get(&k).cloned().with_context(|| format!("pickle memo {k} missing"))?);
            }
            b'j' => {
                let k = r.u32()? as u64;
                stack.push(memo.get(&k).cloned().with_context(|| format!("pickle memo {k} missing"))?);
            }
            b'g' => {
                let k: u64 = r.line()?.trim().parse().context("bad pickle GET")?;
                stack.push(memo.get(&k).cloned().with_context(|| format!("pickle memo {k} missing"))?);
            }
            b'q' => {
                let k = r.u8()? as u64;
                memo.insert(k, stack.memo_copy()?);
            }
            b'r' => {
                let k = r.u32()? as u64;
                memo.insert(k, stack.memo_copy()?);
            }
            b'p' => {
                let k: u64 = r.line()?.trim().parse().context("bad pickle PUT")?;
                memo.insert(k, stack.memo_copy()?);
            }
            0x94 => {
                let k = memo.len() as u64;
                memo.insert(k, stack.memo_copy()?);
            }
            0x97 | 0x98 => bail!("pickle out-of-band buffers are not supported"),
            0x82..=0x84 => bail!("pickle extension registry codes are not supported"),
            other => bail!("unknown pickle opcode 0x{other:02x} at byte {}", r.pos - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interprets_a_dict_with_ints_and_strings() {
        // pickle.dumps({'a': 1, 'b': 'x', 'c': (1.5, None)}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02X\x01\x00\x00\x00xq\x03X\x01\x00\x00\x00cq\x04G?\xf8\x00\x00\x00\x00\x00\x00N\x86q\x05u.";
        let v = unpickle(data).unwrap();
        assert_eq!(v.get("a").unwrap().as_int(), Some(1));
        assert_eq!(v.get("b").unwrap().as_str(), Some("x"));
        match v.get("c").unwrap() {
            Value::Tuple(t) => {
                assert!(matches!(t[0], Value::Float(f) if f == 1.5));
                assert!(matches!(t[1], Value::None));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn globals_and_reduce_are_data_not_code() {
        // pickle.dumps(os.system('echo hi')) style payload: cos\nsystem\n(S'echo hi'\ntR.
        let data = b"cos\nsystem\n(S'echo hi'\ntR.";
        match unpickle(data).unwrap() {
            Value::Object(o) => {
                let o = o.borrow();
                assert_eq!((o.module.as_str(), o.name.as_str()), ("os", "system"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_garbage_pickles_fail_cleanly() {
        assert!(unpickle(b"\x80\x02}q\x00(X\x05\x00\x00\x00ab").is_err());
        assert!(unpickle(b"\xff\xfe").is_err());
        assert!(unpickle(b"").is_err());
        assert!(unpickle(b"0.").is_err());
    }

    #[test]
    fn long1_decodes_signed_little_endian() {
        assert_eq!(long_from_le(&[0xff]).unwrap(), -1);
        assert_eq!(long_from_le(&[0x00, 0x01]).unwrap(), 256);
        assert_eq!(long_from_le(&[]).unwrap(), 0);
    }
}
