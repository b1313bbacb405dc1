package journal

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"

	badger "github.com/dgraph-io/badger/v4"
)

// Image-backed records are what is left of mount --write-once, which is
// gone: a data record whose payload stayed in the local image (its index
// entry names segment 0), plus pieces, the sectors of it that a write of a
// later epoch overwrote, copied to a segment before the overwrite (index
// keys "c" + seq + offset). The journal writes no such record any more,
// but a state directory left by a binary that did may still hold pending
// ones, and they must reach the blob with their own bytes, in their own
// epoch. So, and only while some are pending:
//
//   - recovery lists them with their pieces (legacyRecord);
//   - reading one reads the image (see AttachImage) with its pieces laid
//     over;
//   - a write that changes the image over one waits until it is drained:
//     nothing copies the image aside any more, so it must not change under
//     a pending record (the writer blocks, as it does for space);
//   - Delete drops the record and its pieces, and makes that durable
//     before the writers waiting for it go on, so that a crash cannot bring
//     back a record whose range the image no longer holds.
//
// Replay (writeback's reapply) leaves their payload, the image, alone: see
// Record.InImage.

// pieceKeyPrefix starts the index key of a piece: "c" + big-endian seq +
// big-endian offset; the value is end, segment, segment offset (8 bytes
// each) and the CRC-32C (4).
var pieceKeyPrefix = []byte("c")

const pieceValueSize = 8 + 8 + 8 + 4

// legacyRecord is a pending image-backed record: its range and its pieces
// (sorted, disjoint; fixed once recovery is done).
type legacyRecord struct {
	off, end int64
	pieces   []Record // index entries of the pieces (range, segment, CRC)
}

// AttachImage gives the journal the local image, where the payloads of
// image-backed records are (imagerec.go, and those an older binary wrote,
// legacy.go). Disk does this before it replays or writes anything; without
// it every record goes to segments.
func (j *Journal) AttachImage(f *os.File) { j.img = f }

func pieceKey(seq uint64, off int64) []byte {
	k := make([]byte, 17)
	k[0] = pieceKeyPrefix[0]
	binary.BigEndian.PutUint64(k[1:], seq)
	binary.BigEndian.PutUint64(k[9:], uint64(off))
	return k
}

// decodePiece parses a piece's index entry into the record seq it belongs
// to and the piece's own range, segment and CRC.
func decodePiece(k, v []byte) (uint64, Record, error) {
	if len(k) != 17 || len(v) != pieceValueSize {
		return 0, Record{}, fmt.Errorf("journal piece entry of %d+%d bytes, want 17+%d", len(k), len(v), pieceValueSize)
	}
	be := binary.BigEndian
	seq := be.Uint64(k[1:])
	off, end := int64(be.Uint64(k[9:])), int64(be.Uint64(v[0:]))
	p := Record{Seq: seq, Offset: off, Length: end - off, Kind: KindData, seg: be.Uint64(v[8:]), segOff: int64(be.Uint64(v[16:])), crc: be.Uint32(v[24:])}
	if err := p.check(); err != nil || p.seg == 0 {
		return 0, Record{}, fmt.Errorf("journal record %d, piece at %d: bad range or segment (%d-%d in segment %d)", seq, off, off, end, p.seg)
	}
	return seq, p, nil
}

// recoverLegacy gives the image-backed records recovery found (in
// j.legacy) their pieces and keeps the pieces' segments alive. Pieces were
// deleted in the transaction that deleted their record, so none should
// lack one; any that does is deleted rather than trusted.
func (j *Journal) recoverLegacy() error {
	var stale [][]byte
	err := j.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = false
		opts.Prefix = pieceKeyPrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			k := item.KeyCopy(nil)
			var seq uint64
			var p Record
			if err := item.Value(func(v []byte) error {
				var err error
				seq, p, err = decodePiece(k, v)
				return err
			}); err != nil {
				return err
			}
			lr := j.legacy[seq]
			if lr == nil {
				stale = append(stale, k)
				continue
			}
			if p.Offset < lr.off || p.End() > lr.end {
				return fmt.Errorf("journal record %d: piece %d-%d leaves the record (%d-%d)", seq, p.Offset, p.End(), lr.off, lr.end)
			}
			seg, err := j.segs.get(p.seg)
			if err != nil {
				return fmt.Errorf("journal record %d, piece at %d: %w", seq, p.Offset, err)
			}
			seg.keep(seq)
			lr.pieces = append(lr.pieces, p) // key order: by offset
		}
		return nil
	})
	if err != nil {
		return err
	}
	for seq, lr := range j.legacy {
		for i := 1; i < len(lr.pieces); i++ {
			if lr.pieces[i].Offset < lr.pieces[i-1].End() {
				return fmt.Errorf("journal record %d: pieces at %d and %d overlap", seq, lr.pieces[i-1].Offset, lr.pieces[i].Offset)
			}
		}
	}
	j.legacyN.Store(int64(len(j.legacy)))
	if len(stale) == 0 {
		return nil
	}
	wb := j.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range stale {
		if err := wb.Delete(k); err != nil {
			return err
		}
	}
	return wb.Flush()
}

// loadImageBacked reads the payload of image-backed record r: the image,
// with its pieces laid over.
func (j *Journal) loadImageBacked(r *Record) error {
	j.mu.Lock()
	lr := j.legacy[r.Seq]
	j.mu.Unlock()
	switch {
	case lr == nil:
		return fmt.Errorf("journal record %d: its payload is in the local image but the record is not indexed", r.Seq)
	case j.img == nil:
		return fmt.Errorf("journal record %d: its payload is in the local image, which is not open", r.Seq)
	}
	buf := make([]byte, r.Length)
	if _, err := j.img.ReadAt(buf, r.Offset); err != nil {
		return fmt.Errorf("journal record %d: read %d+%d from the local image: %w", r.Seq, r.Offset, r.Length, err)
	}
	for i := range lr.pieces {
		p := &lr.pieces[i]
		data, err := j.segs.read(p)
		if err != nil {
			return err
		}
		copy(buf[p.Offset-r.Offset:], data)
	}
	r.Data = buf
	return nil
}

// waitLegacy blocks while a pending image-backed record overlaps [off,
// end), until the flusher has drained it or ctx ends. Every such record
// belongs to an epoch below any new write's. A linear scan: they are
// transient, and the write path skips it when there are none.
func (j *Journal) waitLegacy(ctx context.Context, off, end int64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	overlaps := func() bool {
		for _, lr := range j.legacy {
			if lr.off < end && off < lr.end {
				return true
			}
		}
		return false
	}
	if !overlaps() {
		return nil
	}
	stop := context.AfterFunc(ctx, func() {
		j.mu.Lock()
		j.space.Broadcast()
		j.mu.Unlock()
	})
	defer stop()
	j.blocked++
	defer func() { j.blocked-- }()
	for overlaps() {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("waiting for an older journal record to drain: %w", err)
		}
		j.space.Wait()
	}
	return nil
}

// legacyKeys returns the image-backed records among recs (nil when there
// are none) and the index keys of their pieces, which Delete removes with
// them.
func (j *Journal) legacyKeys(recs []Record) (seqs []uint64, keys [][]byte) {
	if j.legacyN.Load() == 0 {
		return nil, nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for i := range recs {
		lr := j.legacy[recs[i].Seq]
		if lr == nil {
			continue
		}
		seqs = append(seqs, recs[i].Seq)
		for _, p := range lr.pieces {
			keys = append(keys, pieceKey(p.Seq, p.Offset))
		}
	}
	return seqs, keys
}

// legacyInRange is legacyKeys for the records with a seq in [first,
// last] (DeleteRange).
func (j *Journal) legacyInRange(first, last uint64) (seqs []uint64, keys [][]byte) {
	if j.legacyN.Load() == 0 {
		return nil, nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for seq, lr := range j.legacy {
		if seq < first || seq > last {
			continue
		}
		seqs = append(seqs, seq)
		for _, p := range lr.pieces {
			keys = append(keys, pieceKey(p.Seq, p.Offset))
		}
	}
	return seqs, keys
}

// forgetLegacy drops seqs, deleted and synced, from the pending
// image-backed records. Called with j.mu held; the caller wakes the
// writers waiting for them.
func (j *Journal) forgetLegacy(seqs []uint64) {
	for _, seq := range seqs {
		delete(j.legacy, seq)
	}
	j.legacyN.Store(int64(len(j.legacy)))
}
