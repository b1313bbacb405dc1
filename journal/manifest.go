package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/pb"
	"google.golang.org/protobuf/proto"

	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// A power loss right after badger flushed a memtable can leave a MANIFEST
// that names a level-0 table whose file is gone, and badger then refuses
// to open ("file does not exist for table N"). Badger fsyncs the table's
// data and the MANIFEST but not the directory entry of the new table:
// ristretto's z.OpenMmapFileUsing (v2.2.0) means to fsync the directory of
// a file it creates, but tests the file's size after setting it, so it
// never does; compactions sync the directory themselves, memtable flushes
// do not. Found by TestJournalPowerCut (a cut right after the MANIFEST's
// fsync).
//
// The table's contents are not lost: no fsync of the journal directory
// happened since the table was made (any would have made its name
// durable), so neither did one after the memtable's log was deleted,
// which comes later; the log is there and badger replays it. Its entries
// not synced yet are still in the intent log, which is recycled only
// after badger's logs and the directory are synced. So such a table is
// dropped from the MANIFEST (a deletion appended to it, as badger writes
// its own) and badger rebuilds it from the log.

// dropUnnamedTables appends a deletion to dir's MANIFEST for every level-0
// table it names whose file is missing, and returns their ids. A missing
// table of a deeper level (made by a compaction, which syncs the
// directory) is damage: it is left for badger to refuse.
func dropUnnamedTables(dir string, opt badger.Options, log *slog.Logger) ([]uint64, error) {
	path := filepath.Join(dir, badger.ManifestFilename)
	fp, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer fp.Close()
	m, end, err := badger.ReplayManifestFile(fp, opt.ExternalMagicVersion, opt)
	if err != nil {
		return nil, nil // badger says what is wrong with it when it opens
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	present := map[uint64]bool{}
	for _, e := range ents {
		if id, err := strconv.ParseUint(strings.TrimSuffix(e.Name(), ".sst"), 10, 64); err == nil && strings.HasSuffix(e.Name(), ".sst") {
			present[id] = true
		}
	}
	var changes []*pb.ManifestChange
	var dropped []uint64
	for id, tm := range m.Tables {
		if present[id] || tm.Level != 0 {
			continue
		}
		changes = append(changes, &pb.ManifestChange{Id: id, Op: pb.ManifestChange_DELETE})
		dropped = append(dropped, id)
	}
	if len(changes) == 0 {
		return nil, nil
	}
	buf, err := proto.Marshal(&pb.ManifestChangeSet{Changes: changes})
	if err != nil {
		return nil, err
	}
	rec := make([]byte, 8, 8+len(buf))
	binary.BigEndian.PutUint32(rec[0:4], uint32(len(buf)))
	binary.BigEndian.PutUint32(rec[4:8], crc32.Checksum(buf, castagnoli))
	rec = append(rec, buf...)
	// A torn tail after the last whole change set (end) is cut first, as
	// badger does when it opens.
	if err := fp.Truncate(end); err != nil {
		return nil, err
	}
	if _, err := fp.WriteAt(rec, end); err != nil {
		return nil, err
	}
	if err := files.Datasync(fp); err != nil {
		return nil, err
	}
	log.Warn("journal index: dropped level-0 tables whose files a power loss took; badger rebuilds them from its log", "tables", dropped)
	return dropped, nil
}

// repairIndex runs dropUnnamedTables before badger opens dir.
func repairIndex(dir string, opt badger.Options, log *slog.Logger) error {
	if _, err := dropUnnamedTables(dir, opt, log); err != nil {
		return fmt.Errorf("open journal %s: check badger's MANIFEST: %w", dir, err)
	}
	return nil
}
