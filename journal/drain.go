package journal

// JournalBytes is what the record counts for against the journal's cap:
// its payload and its index entry.
func (r *Record) JournalBytes() int64 { return r.payloadSize() }

// Appended counts the records appended so far (the next seq): a reader
// that sees it unchanged for a while knows the writers are idle.
func (j *Journal) Appended() uint64 { return j.nextSeq.Load() }

// PendingBytes is Stats().PendingBytes without the rest of Stats (which
// measures the journal's files on disk): the flusher asks for it at every
// plan and while it decides on preemption.
func (j *Journal) PendingBytes() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.pendingBytes
}

// Drained describes a batch the remote holds: every pending record with a
// seq in [FirstSeq, LastSeq], Records of them holding Bytes journal bytes
// (JournalBytes), up to and including epoch LastEpoch.
type Drained struct {
	FirstSeq, LastSeq uint64
	Records           int64
	Bytes             int64
	LastEpoch         uint64
}

// DeleteRange deletes a drained batch given as a seq range, so that the
// flusher need not keep every record of a large batch in memory to delete
// it: it keeps only what coalescing left of them. Every seq in the range
// must belong to the batch, and every record before it must be drained
// already (whole epochs read and committed in seq order make it so). Like
// Delete, it must only run once the image holds the batch durably.
//
// It writes one key, the drained seq, rather than a deletion per record:
// a burst drained as one batch is hundreds of thousands of records, whose
// deletions took seconds at the end of every drain (an unmount's). The
// records' index entries are deleted later, in the background (trim.go);
// until then every reader skips them.
func (j *Journal) DeleteRange(d Drained) error {
	if d.Records == 0 {
		return nil
	}
	legacy, pieceKeys := j.legacyInRange(d.FirstSeq, d.LastSeq)
	imgs := j.imgs.inRange(d.FirstSeq, d.LastSeq)
	if err := j.deleteKeys(pieceKeys, nil, d.LastSeq, d.LastEpoch); err != nil {
		return err
	}
	return j.drained(d.LastSeq, d.LastEpoch, d.Records, d.Bytes, legacy, imgs)
}
