package writeback

import "io"

var errUnexpectedEOF = io.ErrUnexpectedEOF
