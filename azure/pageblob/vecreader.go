package pageblob

import (
	"errors"
	"io"
)

// vecReader reads buffers back to back as one request body. It seeks, so
// the SDK can measure it and rewind it for a retry, and closes as a no-op:
// the buffers belong to the caller.
type vecReader struct {
	bufs [][]byte
	size int64
	pos  int64
	i    int   // buffer holding pos
	at   int64 // offset of bufs[i] in the body
}

func newVecReader(bufs [][]byte) *vecReader {
	r := &vecReader{bufs: bufs}
	for _, b := range bufs {
		r.size += int64(len(b))
	}
	return r
}

// Read implements io.Reader.
func (r *vecReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && r.i < len(r.bufs) {
		b := r.bufs[r.i][r.pos-r.at:]
		k := copy(p[n:], b)
		n += k
		r.pos += int64(k)
		if k == len(b) {
			r.at += int64(len(r.bufs[r.i]))
			r.i++
		}
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Seek implements io.Seeker.
func (r *vecReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.pos
	case io.SeekEnd:
		offset += r.size
	default:
		return r.pos, errors.New("vecReader: bad whence")
	}
	if offset < 0 {
		return r.pos, errors.New("vecReader: negative position")
	}
	offset = min(offset, r.size)
	r.pos, r.i, r.at = offset, 0, 0
	for r.i < len(r.bufs) && r.at+int64(len(r.bufs[r.i])) <= offset {
		r.at += int64(len(r.bufs[r.i]))
		r.i++
	}
	return offset, nil
}

// Close implements io.Closer.
func (r *vecReader) Close() error { return nil }
