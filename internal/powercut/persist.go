package powercut

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// The backing directory holds the durable state and nothing else:
//
//	namespace.json   every inode reachable through durable directory
//	                 entries: type, mode, owner, a directory's entries, a
//	                 symlink's target; and the next inode number
//	data/<id>        a regular file's durable contents and size
//
// namespace.json is rewritten (temporary file, rename) at every fsync of
// a directory that changed it. A mount loads it and deletes the data files
// it does not name: files whose names never became durable.
const (
	namespaceFile = "namespace.json"
	dataDir       = "data"
)

// savedNamespace is namespace.json.
type savedNamespace struct {
	Next   uint64                `json:"next"`
	Inodes map[string]savedInode `json:"inodes"` // by decimal inode number
}

type savedInode struct {
	Mode    uint32            `json:"mode"`
	UID     uint32            `json:"uid"`
	GID     uint32            `json:"gid"`
	Rdev    uint32            `json:"rdev,omitempty"`
	Entries map[string]uint64 `json:"entries,omitempty"`
	Target  string            `json:"target,omitempty"`
}

// load reads the durable state of the backing directory (an empty one is
// an empty file system).
func (f *FS) load() error {
	if err := os.MkdirAll(filepath.Join(f.backing, dataDir), 0o700); err != nil {
		return fmt.Errorf("power-cut backing directory: %w", err)
	}
	f.inodes = map[uint64]*inode{}
	ns := savedNamespace{Next: rootID + 1, Inodes: map[string]savedInode{
		strconv.FormatUint(rootID, 10): {Mode: syscall.S_IFDIR | 0o755},
	}}
	b, err := os.ReadFile(filepath.Join(f.backing, namespaceFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("power-cut backing directory: %w", err)
	default:
		if err := json.Unmarshal(b, &ns); err != nil {
			return fmt.Errorf("power-cut backing directory: %s: %w", namespaceFile, err)
		}
	}
	f.nextID = ns.Next
	now := time.Now()
	for key, si := range ns.Inodes {
		id, err := strconv.ParseUint(key, 10, 64)
		if err != nil {
			return fmt.Errorf("power-cut backing directory: %s: inode %q", namespaceFile, key)
		}
		ino := &inode{id: id, mode: si.Mode, uid: si.UID, gid: si.GID, rdev: si.Rdev, target: si.Target, atime: now, mtime: now, ctime: now}
		switch si.Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			ino.live, ino.durable = map[string]uint64{}, map[string]uint64{}
			for name, c := range si.Entries {
				ino.live[name], ino.durable[name] = c, c
			}
		case syscall.S_IFREG:
			bf, err := os.OpenFile(f.dataPath(id), os.O_CREATE|os.O_RDWR, 0o600)
			if err != nil {
				f.closeFiles()
				return fmt.Errorf("power-cut backing directory: %w", err)
			}
			if ino.data, err = newFileData(bf); err != nil {
				bf.Close()
				f.closeFiles()
				return fmt.Errorf("power-cut backing directory: %w", err)
			}
			if st, err := bf.Stat(); err == nil {
				ino.mtime = st.ModTime()
			}
		}
		f.inodes[id] = ino
		f.nextID = max(f.nextID, id+1)
	}
	if f.inodes[rootID] == nil || !f.inodes[rootID].isDir() {
		f.closeFiles()
		return fmt.Errorf("power-cut backing directory: %s has no root directory", namespaceFile)
	}
	for _, ino := range f.inodes {
		for name, c := range ino.live {
			child := f.inodes[c]
			if child == nil {
				f.closeFiles()
				return fmt.Errorf("power-cut backing directory: %s: entry %q names missing inode %d", namespaceFile, name, c)
			}
			child.links++
			child.drefs++
			child.parent, child.name = ino.id, name
		}
	}
	// Data files no durable name leads to: files created, or unlinked,
	// whose directory was not synced since.
	ents, err := os.ReadDir(filepath.Join(f.backing, dataDir))
	if err != nil {
		f.closeFiles()
		return fmt.Errorf("power-cut backing directory: %w", err)
	}
	for _, e := range ents {
		id, err := strconv.ParseUint(e.Name(), 16, 64)
		if err == nil && f.inodes[id] != nil {
			continue
		}
		if err := os.Remove(filepath.Join(f.backing, dataDir, e.Name())); err != nil {
			f.closeFiles()
			return fmt.Errorf("power-cut backing directory: %w", err)
		}
	}
	return nil
}

// persistLocked writes namespace.json: the inodes durable entries lead to
// from the root (f.mu held).
func (f *FS) persistLocked() error {
	ns := savedNamespace{Next: f.nextID, Inodes: map[string]savedInode{}}
	var walk func(id uint64)
	walk = func(id uint64) {
		key := strconv.FormatUint(id, 10)
		if _, seen := ns.Inodes[key]; seen {
			return
		}
		ino := f.inodes[id]
		if ino == nil {
			return
		}
		ino.mu.Lock()
		si := savedInode{Mode: ino.mode, UID: ino.uid, GID: ino.gid, Rdev: ino.rdev, Target: ino.target}
		ino.mu.Unlock()
		if ino.durable != nil {
			si.Entries = ino.durable
		}
		ns.Inodes[key] = si
		for _, c := range ino.durable {
			walk(c)
		}
	}
	walk(rootID)
	b, err := json.Marshal(ns)
	if err != nil {
		return fmt.Errorf("power-cut namespace: %w", err)
	}
	tmp := filepath.Join(f.backing, namespaceFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("power-cut namespace: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(f.backing, namespaceFile)); err != nil {
		return fmt.Errorf("power-cut namespace: %w", err)
	}
	return nil
}
