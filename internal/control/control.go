// Package control is the mounted daemon's local control channel: a unix
// socket in the state directory (mode 0600, so only the owner reaches it)
// serving the daemon's status as JSON over HTTP, and taking a resize
// (POST /resize). `vhdsync status`, `vhdsync unmount` and `vhdsync resize`
// are its clients.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// SocketName is the socket's file name inside the state directory.
const SocketName = "control.sock"

// Status is what the daemon reports.
type Status struct {
	PID        int       `json:"pid,omitempty"`
	Mountpoint string    `json:"mountpoint"`
	StateDir   string    `json:"state_dir"`
	BlobURL    string    `json:"blob_url"`
	Started    time.Time `json:"started,omitzero"`
	Phase      string    `json:"phase"` // serving, draining, unmounting, stopped
	Note       string    `json:"note,omitempty"`

	JournalRecords  int64     `json:"journal_records"`
	JournalBytes    int64     `json:"journal_bytes"`
	JournalCapBytes int64     `json:"journal_cap_bytes"`
	JournalDisk     int64     `json:"journal_disk_bytes"`
	OldestPending   time.Time `json:"oldest_pending,omitzero"`
	LagSeconds      float64   `json:"lag_seconds"`
	BlockedWriters  int       `json:"blocked_writers"`
	// ImageBacked counts the pending records whose only copy is the local
	// image (writes of 64 KiB or more, written once); Captures and
	// CapturedBytes the copies made of such records before a write
	// changed the image over them; Binds the writes over them that bound
	// their epochs instead of copying (journal/bind.go).
	ImageBacked   int64  `json:"journal_image_backed_records"`
	Captures      uint64 `json:"journal_captures"`
	CapturedBytes uint64 `json:"journal_captured_bytes"`
	Binds         uint64 `json:"journal_binds"`
	// Sync: mounted with --sync (a barrier waits for the blob);
	// SyncDegraded: barriers timed out (--sync-timeout) and return without
	// the blob until it has caught up; SyncTimeouts counts them.
	Sync         bool   `json:"sync,omitempty"`
	SyncDegraded bool   `json:"sync_degraded,omitempty"`
	SyncTimeouts uint64 `json:"sync_timeouts,omitempty"`
	OpenEpoch    uint64 `json:"open_epoch"`
	EpochsClosed uint64 `json:"epochs_closed"`

	RemoteEpoch    uint64  `json:"remote_epoch"`
	RemoteSequence int64   `json:"remote_sequence"`
	LeaseID        string  `json:"lease_id,omitempty"`
	FlusherState   string  `json:"flusher_state"`
	LastError      string  `json:"last_error,omitempty"`
	Batches        uint64  `json:"batches"`
	PutCalls       uint64  `json:"put_calls"`
	ClearCalls     uint64  `json:"clear_calls"`
	SequenceCalls  uint64  `json:"sequence_calls"`
	BytesSent      uint64  `json:"bytes_sent"`
	BytesCleared   uint64  `json:"bytes_cleared"`
	Retries        uint64  `json:"retries"`
	SendRate       float64 `json:"send_bytes_per_second"`
	// Catching up: request and byte rates over the last seconds, answers
	// the service throttled (and that were sent again), the adaptive limit
	// on requests in flight, clean bytes sent to join ranges (fills), and
	// an estimate of the time until the blob holds everything pending at
	// the current rates (0: nothing pending or no estimate yet).
	RequestRate    float64 `json:"requests_per_second"`
	MiBPerSecond   float64 `json:"mib_per_second"`
	Throttled      uint64  `json:"throttled"`
	InFlightLimit  int     `json:"in_flight_limit,omitempty"`
	FilledBytes    uint64  `json:"filled_bytes"`
	CatchUpSeconds float64 `json:"catch_up_seconds"`

	// The staged transfer (Transfer "staged"): StagedEpoch is what the
	// daemon has stored in StagingURL, AppliedEpoch what the worker has
	// applied to the blob (RemoteEpoch is then the same).
	Transfer        string `json:"transfer,omitempty"`
	StagingURL      string `json:"staging_url,omitempty"`
	StagedEpoch     uint64 `json:"staged_epoch,omitempty"`
	AppliedEpoch    uint64 `json:"applied_epoch,omitempty"`
	AppliedError    string `json:"applied_error,omitempty"`
	Segments        uint64 `json:"segments,omitempty"`
	StagedDataBytes uint64 `json:"staged_data_bytes,omitempty"`

	FuseWrites       uint64 `json:"fuse_writes"`
	FuseBytesWritten uint64 `json:"fuse_bytes_written"`
	FuseReads        uint64 `json:"fuse_reads"`
	FuseFsyncs       uint64 `json:"fuse_fsyncs"`
	FuseDiscards     uint64 `json:"fuse_discards"`
	FuseRefused      uint64 `json:"fuse_refused"`

	// RecoveryPoints is the recovery-point state (nil: not known).
	RecoveryPoints *RecoveryPoints `json:"recovery_points,omitempty"`

	// Thin is a thin disk's progress (nil: every chunk is local).
	Thin *Thin `json:"thin,omitempty"`
}

// Thin is the thin-attach part of Status (create --from-blob --thin): how
// much of the blob's data is local, and the fetches that bring the rest.
type Thin struct {
	// AllocatedBytes is the blob's data when the disk was attached;
	// PresentBytes how much of it is local; MissingChunks the 4 MiB
	// chunks holding data not yet local.
	AllocatedBytes int64 `json:"allocated_bytes"`
	PresentBytes   int64 `json:"present_bytes"`
	MissingChunks  int64 `json:"missing_chunks"`
	// This mount's fetches: bytes, read requests, chunks fetched because
	// a read or write needed them and by the background prefetch, and the
	// time reads and writes waited for them; the bytes first reads took
	// straight from the blob while their chunk was fetched behind them.
	FetchedBytes      int64   `json:"fetched_bytes"`
	FetchRequests     int64   `json:"fetch_requests"`
	DemandChunks      int64   `json:"demand_chunks"`
	PrefetchChunks    int64   `json:"prefetch_chunks"`
	DemandWaitSeconds float64 `json:"demand_wait_seconds"`
	FetchBytesPerSec  float64 `json:"fetch_bytes_per_second"`
	ReadThroughBytes  int64   `json:"read_through_bytes"`
	Prefetch          string  `json:"prefetch"`
	CompleteInSeconds float64 `json:"complete_in_seconds,omitempty"`
	Error             string  `json:"error,omitempty"`
}

// RecoveryPoints is the recovery-point part of Status.
type RecoveryPoints struct {
	// Enabled: the daemon takes points (mount --recovery-points).
	Enabled  bool   `json:"enabled"`
	Interval string `json:"interval,omitempty"`
	Keep     int    `json:"keep,omitempty"`
	// Count is the number of recovery points on the blob.
	Count    int    `json:"count"`
	Taken    uint64 `json:"taken"`
	Deleted  uint64 `json:"deleted"`
	Failures uint64 `json:"failures"`
	// LastID, LastEpoch and LastTime describe the newest point.
	LastID        string    `json:"last_id,omitempty"`
	LastEpoch     uint64    `json:"last_epoch,omitempty"`
	LastTime      time.Time `json:"last_time,omitzero"`
	LastError     string    `json:"last_error,omitempty"`
	LastErrorTime time.Time `json:"last_error_time,omitzero"`
}

// Serve listens on the state directory's socket and answers GET /status
// with status(). It returns the server; Close it on exit.
func Serve(stateDir string, status func() Status) (*http.Server, error) {
	return ServeWith(stateDir, Handlers{Status: status})
}

// Handlers are what the daemon answers on its socket.
type Handlers struct {
	// Status answers GET /status.
	Status func() Status
	// Resize answers POST /resize (nil: not offered).
	Resize func(ctx context.Context, req ResizeRequest) (ResizeResult, error)
}

// ResizeRequest asks the daemon to resize its disk (`vhdsync resize`).
type ResizeRequest struct {
	Size   uint64 `json:"size"`
	Shrink bool   `json:"shrink,omitempty"`
}

// ResizeResult is the daemon's answer: what it did, or why not (Error,
// with Code the exit code the command should end with).
type ResizeResult struct {
	From        uint64  `json:"from"`
	To          uint64  `json:"to"`
	Epoch       uint64  `json:"epoch,omitempty"`
	HeldSeconds float64 `json:"held_seconds"`
	Seconds     float64 `json:"seconds"`
	Error       string  `json:"error,omitempty"`
	Code        int     `json:"code,omitempty"`
}

// ServeWith is Serve with every handler the daemon offers.
func ServeWith(stateDir string, h Handlers) (*http.Server, error) {
	status := h.Status
	path := filepath.Join(stateDir, SocketName)
	_ = os.Remove(path) // a stale socket of a dead daemon (the state lock is ours)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(status())
	})
	if h.Resize != nil {
		mux.HandleFunc("POST /resize", func(w http.ResponseWriter, r *http.Request) {
			var req ResizeRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			res, err := h.Resize(r.Context(), req)
			if err != nil && res.Error == "" {
				res.Error = err.Error()
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(res)
		})
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	return srv, nil
}

// ErrNotRunning means no daemon answers on the state directory's socket.
var ErrNotRunning = errors.New("no vhdsync daemon is running for this state directory")

// Get asks the daemon of stateDir for its status.
func Get(ctx context.Context, stateDir string) (Status, error) {
	path := filepath.Join(stateDir, SocketName)
	c := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://vhdsync/status", nil)
	resp, err := c.Do(req)
	if err != nil {
		return Status{}, fmt.Errorf("%w (%v)", ErrNotRunning, err)
	}
	defer resp.Body.Close()
	var s Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return Status{}, fmt.Errorf("read daemon status: %w", err)
	}
	return s, nil
}

// Resize asks the daemon of stateDir to resize its disk and waits for its
// answer (the daemon drains the journal first, so this may take as long as
// the blob needs to catch up; ctx bounds it). A refusal or failure comes
// back in the result's Error and Code.
func Resize(ctx context.Context, stateDir string, req ResizeRequest) (ResizeResult, error) {
	path := filepath.Join(stateDir, SocketName)
	c := &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}
	body, err := json.Marshal(req)
	if err != nil {
		return ResizeResult{}, err
	}
	hreq, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://vhdsync/resize", bytes.NewReader(body))
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(hreq)
	if err != nil {
		return ResizeResult{}, fmt.Errorf("%w (%v)", ErrNotRunning, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusMethodNotAllowed {
		return ResizeResult{}, fmt.Errorf("the running daemon does not offer resize (an older vhdsync?); unmount the disk, then run resize again")
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return ResizeResult{}, fmt.Errorf("daemon refused the resize request: %s: %s", resp.Status, bytes.TrimSpace(b))
	}
	var res ResizeResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return ResizeResult{}, fmt.Errorf("read the daemon's resize answer: %w", err)
	}
	return res, nil
}
