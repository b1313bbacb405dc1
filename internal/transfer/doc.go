// Package transfer moves whole disks between local files and page blobs:
// the initial sync of an existing disk (Importer: a fixed VHD, a dynamic VHD
// or a raw image to a new page blob and a state directory ready for
// `vhdsync mount`), and the way back (Download: a blob to a local sparse
// fixed VHD or raw image; CreateStateFromBlob: a blob to a new state
// directory; RunIncremental: a local copy of one recovery point to a later
// one, rewriting only the ranges changed in between, with PointRecord
// saying which point a file holds).
//
// What goes on the wire. The importer reads only the allocated parts of the
// source (the BAT and sector bitmaps of a dynamic VHD, SEEK_DATA/SEEK_HOLE
// of a fixed VHD or raw image), one window of the 4 MiB grid at a time, and
// finds the non-zero 512-byte sectors in it. Runs of non-zero sectors
// become Put Page requests (at most 4 MiB, 512-byte aligned, each with a
// CRC64 computed here); a zero run shorter than ZeroGap between two data
// runs of one window is sent with them, to save a request (Azure counts
// requests as well as bytes), while zero sectors at the edges of a range
// are never sent. A new page blob reads as zeros, so nothing else is
// needed. The downloader reads only the page ranges the blob reports.
//
// Resume. The importer keeps its progress in the state directory
// (import-progress.json): the source's identity (path, size, mtime, SHA-256
// of its last 512 bytes), the blob and footer it created, the lease it
// holds and the windows done (a frontier plus the done windows above it).
// A rerun refuses a changed source (ErrSourceChanged), checks the recorded
// windows against the blob's page ranges, rescans the windows not recorded
// and sends only the parts of them the blob does not hold yet. So nothing
// the blob holds is sent again; what was in flight when the import stopped
// (at most one request per worker) may be.
package transfer
