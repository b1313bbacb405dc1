package vhdlayer

import (
	"fmt"
	"math/bits"
	"strconv"
	"strings"
)

// Byte multiples.
const (
	KiB uint64 = 1 << 10
	MiB uint64 = 1 << 20
	GiB uint64 = 1 << 30
	TiB uint64 = 1 << 40
)

// MinVirtualSize is the smallest disk Azure imports as a managed disk (20 MiB).
const MinVirtualSize = 20 * MiB

// MaxPageBlobSize is the largest page blob Azure stores (8 TiB).
const MaxPageBlobSize = 8 * TiB

// MaxVirtualSize is the largest virtual size whose blob (size + footer) fits
// in a page blob and is still a whole number of MiB: 8 TiB - 1 MiB.
const MaxVirtualSize = MaxPageBlobSize - MiB

// SizeHelp explains the accepted size syntax; the CLI prints it in --help.
const SizeHelp = `SIZE is a number with an optional unit. K, M, G, T and KiB, MiB, GiB, TiB
are powers of 1024 (G = GiB = 1073741824 bytes); KB, MB, GB, TB are powers
of 1000; no unit means bytes. Azure needs a whole number of MiB between
20 MiB and 8 TiB - 1 MiB.`

// ParseSize parses a user-supplied size such as "20GiB", "512M", "1TiB",
// "1.5GiB" or "1073741824". See SizeHelp for the units.
func ParseSize(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("%w: empty size (examples: 20GiB, 512MiB, 1TiB, 1073741824)", ErrBadSize)
	}
	i := 0
	for i < len(in) && (in[i] >= '0' && in[i] <= '9' || in[i] == '.') {
		i++
	}
	num, unit := in[:i], strings.TrimSpace(in[i:])
	if num == "" {
		return 0, fmt.Errorf("%w: %q does not start with a number (examples: 20GiB, 512MiB, 1TiB)", ErrBadSize, s)
	}
	mult, ok := unitMultiplier(unit)
	if !ok {
		return 0, fmt.Errorf("%w: unknown unit %q in %q (use K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB, TB or none for bytes)", ErrBadSize, unit, s)
	}
	if !strings.Contains(num, ".") {
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %q: %v", ErrBadSize, s, err)
		}
		hi, lo := bits.Mul64(n, mult)
		if hi != 0 {
			return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrBadSize, s)
		}
		return lo, nil
	}
	// A fractional value: parse as an exact decimal to avoid float rounding.
	whole, frac, _ := strings.Cut(num, ".")
	if strings.Contains(frac, ".") || (whole == "" && frac == "") {
		return 0, fmt.Errorf("%w: %q is not a number", ErrBadSize, s)
	}
	if len(frac) > 9 {
		return 0, fmt.Errorf("%w: %q has more than 9 decimal places", ErrBadSize, s)
	}
	w := uint64(0)
	if whole != "" {
		var err error
		if w, err = strconv.ParseUint(whole, 10, 64); err != nil {
			return 0, fmt.Errorf("%w: %q: %v", ErrBadSize, s, err)
		}
	}
	f := uint64(0)
	scale := uint64(1)
	if frac != "" {
		var err error
		if f, err = strconv.ParseUint(frac, 10, 64); err != nil {
			return 0, fmt.Errorf("%w: %q: %v", ErrBadSize, s, err)
		}
		for range frac {
			scale *= 10
		}
	}
	hi, total := bits.Mul64(w, mult)
	fhi, fpart := bits.Mul64(f, mult)
	if hi != 0 || fhi != 0 {
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrBadSize, s)
	}
	if fpart%scale != 0 {
		return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrBadSize, s)
	}
	sum, carry := bits.Add64(total, fpart/scale, 0)
	if carry != 0 {
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrBadSize, s)
	}
	return sum, nil
}

func unitMultiplier(u string) (uint64, bool) {
	switch strings.ToLower(u) {
	case "", "b":
		return 1, true
	case "k", "kib":
		return KiB, true
	case "m", "mib":
		return MiB, true
	case "g", "gib":
		return GiB, true
	case "t", "tib":
		return TiB, true
	case "kb":
		return 1e3, true
	case "mb":
		return 1e6, true
	case "gb":
		return 1e9, true
	case "tb":
		return 1e12, true
	}
	return 0, false
}

// FormatSize renders n bytes in the largest binary unit that divides it
// exactly, else with two decimals and the exact byte count.
func FormatSize(n uint64) string {
	for _, u := range []struct {
		m    uint64
		name string
	}{{TiB, "TiB"}, {GiB, "GiB"}, {MiB, "MiB"}, {KiB, "KiB"}} {
		if n >= u.m && n%u.m == 0 {
			return fmt.Sprintf("%d %s", n/u.m, u.name)
		}
	}
	for _, u := range []struct {
		m    uint64
		name string
	}{{TiB, "TiB"}, {GiB, "GiB"}, {MiB, "MiB"}, {KiB, "KiB"}} {
		if n >= u.m {
			return fmt.Sprintf("%.2f %s (%d bytes)", float64(n)/float64(u.m), u.name, n)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}

// RoundUpMiB rounds n up to the next whole MiB.
func RoundUpMiB(n uint64) uint64 { return (n + MiB - 1) / MiB * MiB }

// sizeError is a size rule violation: its message is written for the
// user, and it matches each violated rule's sentinel with errors.Is.
type sizeError struct {
	msg   string
	rules []error
}

// Error implements error.
func (e *sizeError) Error() string { return e.msg }

// Unwrap returns the wrapped error(s).
func (e *sizeError) Unwrap() []error { return e.rules }

// ValidateVirtualSize checks size against Azure's rules for a disk: a whole
// number of MiB, at least MinVirtualSize, at most MaxVirtualSize. The error
// names the nearest sizes that would be accepted.
func ValidateVirtualSize(size uint64) error {
	notMiB := size%MiB != 0
	switch {
	case size < MinVirtualSize && notMiB:
		return &sizeError{fmt.Sprintf("%s is smaller than the %s Azure requires, and not a whole number of MiB; the nearest valid size is %d (%s)",
			FormatSize(size), FormatSize(MinVirtualSize), MinVirtualSize, FormatSize(MinVirtualSize)), []error{ErrSizeTooSmall, ErrSizeNotMiB}}
	case size < MinVirtualSize:
		return &sizeError{fmt.Sprintf("%s is smaller than the %s Azure requires; the nearest valid size is %d (%s)",
			FormatSize(size), FormatSize(MinVirtualSize), MinVirtualSize, FormatSize(MinVirtualSize)), []error{ErrSizeTooSmall}}
	case size > MaxVirtualSize:
		return &sizeError{fmt.Sprintf("%s is larger than %s (%d bytes), the largest disk whose page blob (disk + 512-byte footer) fits Azure's 8 TiB page-blob limit",
			FormatSize(size), FormatSize(MaxVirtualSize), MaxVirtualSize), []error{ErrSizeTooLarge}}
	case notMiB:
		down := size / MiB * MiB
		up := down + MiB
		var near []string
		if down >= MinVirtualSize {
			near = append(near, fmt.Sprintf("%d (%s)", down, FormatSize(down)))
		}
		if up <= MaxVirtualSize {
			near = append(near, fmt.Sprintf("%d (%s)", up, FormatSize(up)))
		}
		return &sizeError{fmt.Sprintf("%d bytes is not a whole number of MiB, which Azure requires of a disk; nearest valid sizes: %s",
			size, strings.Join(near, " or ")), []error{ErrSizeNotMiB}}
	}
	return nil
}
