//! A raw pointer that parallel tasks share to write disjoint parts of one output buffer.

#[derive(Clone, Copy)]
pub struct SharedMut(*mut f32);

// SAFETY: every user writes only to the elements of its own task; tasks never overlap.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(s: &mut [f32]) -> Self {
        Self(s.as_mut_ptr())
    }
    /// # Safety
    /// `offset..offset+len` must lie in the buffer and be written by this task alone, and the
    /// buffer must outlive the returned slice (its lifetime is the caller's to bound).
    pub unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}
