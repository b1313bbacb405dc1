package journal

import (
	"errors"
	"io"
)

// ErrJournalDamaged: the journal's index or payload segments cannot be read
// back (a file missing, cut short or overwritten). Nothing is replayed or
// deleted then: the journal is left as it is for the user to decide.
var ErrJournalDamaged = errors.New("the journal is damaged")

var errUnexpectedEOF = io.ErrUnexpectedEOF
