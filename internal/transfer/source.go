package transfer

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/vhdlayer"
)

// Format is what the caller says the source file is.
type Format string

// Source formats.
const (
	FormatAuto Format = "auto" // a VHD if it ends in a VHD footer, else raw
	FormatRaw  Format = "raw"  // a raw disk image, whatever its last bytes hold
	FormatVHD  Format = "vhd"  // a fixed or dynamic VHD; anything else is an error
)

// ParseFormat checks a --format value.
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case FormatAuto, FormatRaw, FormatVHD:
		return f, nil
	case "":
		return FormatAuto, nil
	}
	return "", fmt.Errorf("unknown format %q: use auto, raw or vhd", s)
}

// Kind is what a source turned out to be.
type Kind string

// Source kinds.
const (
	KindRaw     Kind = "raw image"
	KindFixed   Kind = "fixed VHD"
	KindDynamic Kind = "dynamic VHD"
)

// Identity is what tells whether a source file changed between an
// interrupted import and its resumption.
type Identity struct {
	Path         string    `json:"path"`
	Size         int64     `json:"size"`
	ModTime      time.Time `json:"mtime"`
	FooterSHA256 string    `json:"footer_sha256"` // of the file's last 512 bytes
}

// Source is an opened disk to import: its data region (the virtual disk)
// and where in it data may be.
type Source struct {
	Kind Kind
	// DataSize is the size of the source's disk: the file size of a raw
	// image, the footer's current size of a VHD.
	DataSize int64
	// VirtualSize is DataSize rounded up to a whole MiB (and to Azure's
	// 20 MiB minimum): the size of the disk made from it. Bytes past
	// DataSize read as zeros.
	VirtualSize int64
	// Footer is the source's own footer (VHD sources only).
	Footer   *vhdlayer.Footer
	Identity Identity

	f      *os.File
	data   io.ReaderAt // reads [0, DataSize)
	dyn    *vhdlayer.DynamicDisk
	isFile bool // data is f itself (raw, fixed): holes can be found with SEEK_DATA
}

// Rounded reports whether VirtualSize differs from DataSize.
func (s *Source) Rounded() bool { return s.VirtualSize != s.DataSize }

// Close closes the file.
func (s *Source) Close() error { return s.f.Close() }

// OpenSource opens path as a disk of format f. A VHD is read through its
// footer (fixed: the first current-size bytes; dynamic: through the BAT and
// sector bitmaps); a differencing VHD is refused (vhdlayer.ErrDifferencing).
// A file that does not end in a VHD footer is a raw image for FormatAuto.
func OpenSource(path string, f Format) (*Source, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	file, err := os.Open(abs)
	if err != nil {
		return nil, fmt.Errorf("open source: %w", err)
	}
	s, err := openSource(file, abs, f)
	if err != nil {
		file.Close()
		return nil, err
	}
	return s, nil
}

func openSource(file *os.File, abs string, format Format) (*Source, error) {
	st, err := file.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat source: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("source %s is not a regular file (%s); vhdsync imports disk image files", abs, st.Mode().Type())
	}
	size := st.Size()
	s := &Source{f: file, Identity: Identity{Path: abs, Size: size, ModTime: st.ModTime().UTC()}}
	var tail [vhdlayer.FooterSize]byte
	if size >= vhdlayer.FooterSize {
		if _, err := file.ReadAt(tail[:], size-vhdlayer.FooterSize); err != nil {
			return nil, fmt.Errorf("read the last 512 bytes of %s: %w", abs, err)
		}
	} else if size > 0 {
		if _, err := file.ReadAt(tail[vhdlayer.FooterSize-size:], 0); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read %s: %w", abs, err)
		}
	}
	sum := sha256.Sum256(tail[:])
	s.Identity.FooterSHA256 = hex.EncodeToString(sum[:])

	raw := func() (*Source, error) {
		if size == 0 {
			return nil, fmt.Errorf("source %s is empty", abs)
		}
		s.Kind, s.DataSize, s.data, s.isFile = KindRaw, size, file, true
		return s.sized()
	}
	if format == FormatRaw {
		return raw()
	}
	footer, ferr := vhdlayer.DecodeFooter(tail[:])
	if ferr != nil {
		// Not a footer at the end. A dynamic VHD keeps a copy at offset 0
		// that OpenDynamic falls back to; try it when either copy at least
		// carries the cookie.
		var head [vhdlayer.FooterSize]byte
		_, _ = file.ReadAt(head[:], 0)
		cookieEnd := string(tail[:8]) == vhdlayer.Cookie
		cookieHead := string(head[:8]) == vhdlayer.Cookie
		if cookieEnd || cookieHead {
			d, derr := vhdlayer.OpenDynamic(file, size)
			if derr == nil {
				return s.dynamic(d)
			}
			if errors.Is(derr, vhdlayer.ErrDifferencing) {
				return nil, fmt.Errorf("source %s: %w", abs, derr)
			}
			if cookieEnd || format == FormatVHD {
				return nil, fmt.Errorf("source %s: %w (if it is really a raw disk image, pass --format raw)", abs, ferr)
			}
		}
		if format == FormatVHD {
			return nil, fmt.Errorf("source %s: %w", abs, ferr)
		}
		return raw()
	}
	switch footer.DiskType {
	case vhdlayer.DiskTypeFixed:
		if uint64(size) != footer.CurrentSize+vhdlayer.FooterSize {
			return nil, fmt.Errorf("source %s: %w: its footer describes a fixed disk of %d bytes, so the file should be %d bytes, but it is %d (truncated or padded?)",
				abs, vhdlayer.ErrSizeMismatch, footer.CurrentSize, footer.CurrentSize+vhdlayer.FooterSize, size)
		}
		s.Kind, s.DataSize, s.data, s.isFile = KindFixed, int64(footer.CurrentSize), file, true
		s.Footer = &footer
		return s.sized()
	case vhdlayer.DiskTypeDynamic, vhdlayer.DiskTypeDifferencing:
		d, err := vhdlayer.OpenDynamic(file, size)
		if err != nil {
			return nil, fmt.Errorf("source %s: %w", abs, err)
		}
		return s.dynamic(d)
	}
	return nil, fmt.Errorf("source %s: %w: its footer has disk type %s; vhdsync imports fixed and dynamic VHDs and raw images", abs, vhdlayer.ErrNotFixed, footer.DiskType)
}

func (s *Source) dynamic(d *vhdlayer.DynamicDisk) (*Source, error) {
	f := d.Footer()
	s.Kind, s.DataSize, s.data, s.dyn, s.Footer = KindDynamic, d.VirtualSize(), d, d, &f
	return s.sized()
}

// sized computes VirtualSize from DataSize.
func (s *Source) sized() (*Source, error) {
	v := vhdlayer.RoundUpMiB(uint64(s.DataSize))
	v = max(v, vhdlayer.MinVirtualSize)
	if err := vhdlayer.ValidateVirtualSize(v); err != nil {
		return nil, fmt.Errorf("source %s (%s of %d bytes): %w", s.Identity.Path, s.Kind, s.DataSize, err)
	}
	s.VirtualSize = int64(v)
	return s, nil
}

// ReadAt reads the virtual disk: the source's data, zeros past DataSize.
func (s *Source) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	if off < s.DataSize {
		want := int(min(int64(len(p)), s.DataSize-off))
		m, err := s.data.ReadAt(p[:want], off)
		if m < want {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return m, fmt.Errorf("read source %s at %d: %w", s.Identity.Path, off, err)
		}
		n = want
	}
	clear(p[n:])
	return len(p), nil
}

// Extents returns the parts of the data region that may hold data, sorted
// and disjoint: a dynamic VHD's allocated sectors, a file's data extents
// (SEEK_DATA/SEEK_HOLE; the whole region where the filesystem cannot tell).
// Everything else reads as zeros.
func (s *Source) Extents() ([]vhdlayer.Extent, error) {
	if s.dyn != nil {
		return s.dyn.Extents()
	}
	return FileExtents(s.f, s.DataSize)
}

// FileExtents lists the data ranges of the first size bytes of f with
// SEEK_DATA/SEEK_HOLE (the whole range where the filesystem cannot tell).
func FileExtents(f *os.File, size int64) ([]vhdlayer.Extent, error) {
	var out []vhdlayer.Extent
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return []vhdlayer.Extent{{Offset: 0, Length: size}}, nil
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		hole = min(hole, size)
		out = append(out, vhdlayer.Extent{Offset: data, Length: hole - data})
		off = hole
	}
	return out, nil
}

// Check compares the file at id.Path with id and returns an error wrapping
// ErrSourceChanged that names what differs.
func (id Identity) Check(now Identity) error {
	var diffs []string
	if id.Path != now.Path {
		diffs = append(diffs, fmt.Sprintf("path %s, was %s", now.Path, id.Path))
	}
	if id.Size != now.Size {
		diffs = append(diffs, fmt.Sprintf("size %d bytes, was %d", now.Size, id.Size))
	}
	if !id.ModTime.Equal(now.ModTime) {
		diffs = append(diffs, fmt.Sprintf("modified %s, was %s", now.ModTime.Format(time.RFC3339Nano), id.ModTime.Format(time.RFC3339Nano)))
	}
	if id.FooterSHA256 != now.FooterSHA256 {
		diffs = append(diffs, "its last 512 bytes (the VHD footer) differ")
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrSourceChanged, joinList(diffs))
}

func joinList(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += "; "
		}
		out += x
	}
	return out
}
