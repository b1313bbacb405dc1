// Package bytediff finds where two byte slices differ, for tests that
// compare a disk image with a blob and report the first differing offset.
package bytediff

// First returns the index of the first byte where a and b differ, the
// shorter length if one is a prefix of the other, or -1 if they are equal.
func First(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// Zero reports whether every byte of b is zero: b differs nowhere from a
// hole.
func Zero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
