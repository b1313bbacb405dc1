// Package control is the mounted daemon's local control channel: a unix
// socket in the state directory (mode 0600, so only the owner reaches it)
// serving the daemon's status as JSON over HTTP. `vhdsync status` and
// `vhdsync unmount` are its clients.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
