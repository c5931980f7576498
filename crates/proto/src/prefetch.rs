//! Cache hints: ask the memory for data a coming step will read, while the
//! current one runs. They change nothing the program can see.

/// Prefetches `lines` cache lines (64 bytes each, at most 16) from `at`.
pub fn prefetch_lines<T>(at: *const T, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..lines.min(16) {
        let p = at.cast::<i8>().wrapping_add(line * 64);
        // SAFETY: a prefetch is a hint: it reads nothing the program sees
        // and never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, lines);
}

/// Prefetches the lines of a slice (at most 16).
pub fn prefetch_slice<T>(items: &[T]) {
    prefetch_lines(items.as_ptr(), std::mem::size_of_val(items).div_ceil(64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_never_faults_whatever_the_address() {
        prefetch_lines(std::ptr::null::<u8>(), 4);
        prefetch_lines(usize::MAX as *const u64, 16);
        let v: Vec<u64> = Vec::new();
        prefetch_slice(&v);
        prefetch_slice(&[0u8; 4096]);
    }
}
