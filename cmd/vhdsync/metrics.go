package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/pflag"

	"github.com/vhdsync/vhdsync/fusefs"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/writeback"
)

// registerMetricsFlag adds mount's --metrics.
func registerMetricsFlag(fl *pflag.FlagSet, addr *string) {
	fl.StringVar(addr, "metrics", "", "serve Prometheus metrics at http://`ADDR`/metrics (off by default); a bare port (9464) or :PORT listens on 127.0.0.1 only, HOST:PORT on that address (0.0.0.0:9464 on every interface)")
}

// metricsArgs passes --metrics on to the background daemon.
func metricsArgs(f mountFlags) []string {
	if f.metrics == "" {
		return nil
	}
	return []string{"--metrics", f.metrics}
}

// metricsListenAddr resolves --metrics: a bare port or :PORT is loopback
// (the metrics say how far the replica lags and how much the disk writes:
// nothing to publish to the network by accident), HOST:PORT is taken as
// given.
func metricsListenAddr(s string) (string, error) {
	bad := func() error {
		return usageError{fmt.Errorf("--metrics %q: give a port (9464), :PORT (both on 127.0.0.1) or HOST:PORT", s)}
	}
	host, port := "", s
	if _, err := strconv.Atoi(s); err != nil {
		var serr error
		if host, port, serr = net.SplitHostPort(s); serr != nil {
			return "", bad()
		}
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", bad()
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// metricsServer is mount's Prometheus endpoint. The listener is bound
// before the mount (a bad or taken address fails the mount, as with
// --debug-pprof), the handler once the disk is open. Every value but the
// FUSE latency histograms is read from the daemon's existing counters at
// scrape time (writeback.Disk.Stats, fusefs.Counters,
// points.RecoveryPoints.Stats), the very numbers `vhdsync status` shows.
type metricsServer struct {
	ln      net.Listener
	log     *slog.Logger
	reg     *prometheus.Registry
	latency *prometheus.HistogramVec
	srv     *http.Server
}

// listenMetrics binds --metrics (nil server when it is empty).
func listenMetrics(addr string, log *slog.Logger) (*metricsServer, error) {
	if addr == "" {
		return nil, nil
	}
	la, err := metricsListenAddr(addr)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", la)
	if err != nil {
		return nil, fmt.Errorf("--metrics %s: %w (choose another port)", addr, err)
	}
	m := &metricsServer{ln: ln, log: log, reg: prometheus.NewRegistry()}
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "vhdsync_fuse_duration_seconds",
		Help: "Time to answer a FUSE write (journaled and applied to the local image) or fsync (a barrier: the journal made durable), by op.",
		// 50 µs (a small write) to 30 s (writers held at the journal cap).
		Buckets: []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5, 10, 30},
	}, []string{"op"})
	return m, nil
}

// observeLatency is the fusefs.Options.Latency hook (nil without metrics).
func (m *metricsServer) observeLatency() func(op string, d time.Duration) {
	if m == nil {
		return nil
	}
	write, fsync := m.latency.WithLabelValues(fusefs.OpWrite), m.latency.WithLabelValues(fusefs.OpFsync)
	return func(op string, d time.Duration) {
		switch op {
		case fusefs.OpWrite:
			write.Observe(d.Seconds())
		case fusefs.OpFsync:
			fsync.Observe(d.Seconds())
		}
	}
}

// serve starts answering scrapes of the mounted disk.
func (m *metricsServer) serve(disk *writeback.Disk, fc *fusefs.Counters, rp *points.RecoveryPoints, blobURL string) error {
	if m == nil {
		return nil
	}
	c := newDiskCollector(disk.Stats, fc, rp, blobURL)
	for _, col := range []prometheus.Collector{c, m.latency, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		if err := m.reg.Register(col); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(m.log.Handler(), slog.LevelWarn)}))
	m.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	m.log.Info("serving Prometheus metrics", "addr", m.ln.Addr().String(), "url", "http://"+m.ln.Addr().String()+"/metrics")
	go func() {
		// Serve returns only when the listener fails or close is called:
		// the metrics are gone, the mount is not affected.
		if err := m.srv.Serve(m.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.log.Warn("metrics server stopped", "err", err)
		}
	}()
	return nil
}

// close stops the endpoint (the daemon is stopping).
func (m *metricsServer) close() {
	if m == nil {
		return
	}
	if m.srv != nil {
		_ = m.srv.Close()
		return
	}
	_ = m.ln.Close()
}

// flusherStates are the values of vhdsync_flusher_state's label.
var flusherStates = []replicate.State{replicate.StateIdle, replicate.StateDraining, replicate.StateRetrying, replicate.StateFailed, replicate.StateStopped}

// diskCollector reads the disk's counters at each scrape.
type diskCollector struct {
	stats   func() writeback.Stats
	fuse    *fusefs.Counters
	points  *points.RecoveryPoints
	blobURL string
	d       map[string]*prometheus.Desc
}

// metricDefs are the metrics diskCollector exports: name, help, labels.
// README's "Metrics" table lists the same.
var metricDefs = []struct {
	name, help string
	labels     []string
}{
	{"vhdsync_info", "Always 1; the labels name the version and the blob (without any SAS).", []string{"version", "blob"}},
	{"vhdsync_replica_lag_seconds", "Age of the oldest write not yet on the blob (0: the blob holds every write).", nil},
	{"vhdsync_sync_degraded", "1 while synchronous replication (--sync) is degraded: barriers timed out (--sync-timeout) and return without the blob until it has caught up; 0 otherwise.", nil},
	{"vhdsync_sync_timeouts_total", "Barriers of synchronous replication (--sync) that returned without the blob after --sync-timeout.", nil},
	{"vhdsync_thin_missing_bytes", "A thin-attached disk: the blob's data not yet local (0: every chunk is local, or the disk is not thin).", nil},
	{"vhdsync_thin_fetched_bytes_total", "A thin-attached disk: bytes fetched from the blob by reads, writes and the prefetch.", nil},
	{"vhdsync_thin_fetch_requests_total", "A thin-attached disk: read requests the fetches sent to the blob.", nil},
	{"vhdsync_journal_pending_bytes", "Journal bytes of the writes not yet on the blob.", nil},
	{"vhdsync_journal_pending_records", "Journal records (writes, discards) not yet on the blob.", nil},
	{"vhdsync_journal_cap_bytes", "Pending journal bytes above which writers wait (--journal-cap).", nil},
	{"vhdsync_journal_disk_bytes", "Disk space the journal's files take.", nil},
	{"vhdsync_journal_blocked_writers", "Writers waiting because the journal is at its cap.", nil},
	{"vhdsync_journal_image_backed_records", "Pending writes of 64 KiB or more whose only copy is the local image.", nil},
	{"vhdsync_journal_captures_total", "Image-backed writes copied to the journal before a later write changed the image over them.", nil},
	{"vhdsync_journal_captured_bytes_total", "Bytes of those copies.", nil},
	{"vhdsync_journal_binds_total", "Writes over image-backed writes that bound their epochs (sent in one batch) instead of copying them.", nil},
	{"vhdsync_journal_open_epoch", "The epoch writes go to now (closed by the next barrier).", nil},
	{"vhdsync_journal_epochs_closed_total", "Epochs closed (barriers and lingers).", nil},
	{"vhdsync_remote_requests_total", "Requests that reached the blob, by kind: put (Put Page), clear (Clear Pages), sequence (sequence number updates).", []string{"kind"}},
	{"vhdsync_remote_bytes_total", "Bytes written to the blob, by kind: put (payload of Put Page), clear (ranges cleared by Clear Pages, no payload). With the staged transfer, put counts the compressed segment bytes uploaded.", []string{"kind"}},
	{"vhdsync_remote_filled_bytes_total", "Clean bytes sent inside Put Pages to join pending ranges (part of put bytes).", nil},
	{"vhdsync_remote_retries_total", "Requests sent again after a failure.", nil},
	{"vhdsync_remote_throttled_total", "Answers the service throttled (503 ServerBusy, 500 OperationTimedOut, 429); each was sent again.", nil},
	{"vhdsync_remote_in_flight_limit", "The adaptive limit on requests in flight to the blob.", nil},
	{"vhdsync_blob_sequence_number", "The blob's sequence number: even (2e) the blob is the disk as of the barrier closing epoch e; odd while a merged batch is applied.", nil},
	{"vhdsync_blob_epoch", "The last epoch the blob holds completely.", nil},
	{"vhdsync_blob_consistent", "1 when the blob's sequence number is even (a crash-consistent disk), 0 while a merged batch is applied.", nil},
	{"vhdsync_flusher_state", "1 for the flusher's current state (idle, draining, retrying, failed, stopped), 0 for the others.", []string{"state"}},
	{"vhdsync_flusher_batches_total", "Batches the flusher completed.", nil},
	{"vhdsync_flusher_drained_bytes_total", "Journal bytes the blob holds and the journal deleted.", nil},
	{"vhdsync_flusher_preempted_batches_total", "Batches stopped for a larger one when the writers paused.", nil},
	{"vhdsync_staged_segments_total", "Segments stored in the staging container (--transfer staged).", nil},
	{"vhdsync_staged_data_bytes_total", "Data bytes the stored segments carry (--transfer staged).", nil},
	{"vhdsync_fuse_operations_total", "FUSE operations answered, by op: read, write, fsync, discard, zero_range.", []string{"op"}},
	{"vhdsync_fuse_bytes_total", "Bytes read and written through FUSE, by op.", []string{"op"}},
	{"vhdsync_fuse_refused_total", "FUSE operations refused (footer changes, truncation, out of range).", nil},
	{"vhdsync_recovery_points_enabled", "1 when the mount takes recovery points (--recovery-points).", nil},
	{"vhdsync_recovery_points", "Recovery points on the blob at the last listing.", nil},
	{"vhdsync_recovery_points_taken_total", "Recovery points (blob snapshots) taken.", nil},
	{"vhdsync_recovery_points_deleted_total", "Recovery points deleted by retention (--keep).", nil},
	{"vhdsync_recovery_points_failed_total", "Failed recovery-point attempts (snapshot, listing or delete).", nil},
	{"vhdsync_recovery_point_last_timestamp_seconds", "When the newest recovery point was taken (Unix time; 0: none).", nil},
}

func newDiskCollector(stats func() writeback.Stats, fc *fusefs.Counters, rp *points.RecoveryPoints, blobURL string) *diskCollector {
	c := &diskCollector{stats: stats, fuse: fc, points: rp, blobURL: blobURL, d: map[string]*prometheus.Desc{}}
	for _, m := range metricDefs {
		c.d[m.name] = prometheus.NewDesc(m.name, m.help, m.labels, nil)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *diskCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.d {
		ch <- d
	}
}

// Collect implements prometheus.Collector: one read of every counter.
func (c *diskCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(name string, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.d[name], prometheus.GaugeValue, v, labels...)
	}
	counter := func(name string, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(c.d[name], prometheus.CounterValue, float64(v), labels...)
	}
	s := c.stats()
	j, f := s.Journal, s.Flusher
	gauge("vhdsync_info", 1, version, c.blobURL)
	lag := 0.0
	if !j.OldestNotOnRemote.IsZero() {
		lag = time.Since(j.OldestNotOnRemote).Seconds()
	}
	gauge("vhdsync_replica_lag_seconds", lag)
	degraded := 0.0
	if s.Sync.Degraded {
		degraded = 1
	}
	gauge("vhdsync_sync_degraded", degraded)
	counter("vhdsync_sync_timeouts_total", s.Sync.Timeouts)
	var thinMissing float64
	var thinFetched, thinRequests uint64
	if t := s.Thin; t != nil {
		thinMissing = float64(t.AllocatedBytes - t.PresentBytes)
		thinFetched, thinRequests = uint64(t.FetchedBytes), uint64(t.Requests)
	}
	gauge("vhdsync_thin_missing_bytes", thinMissing)
	counter("vhdsync_thin_fetched_bytes_total", thinFetched)
	counter("vhdsync_thin_fetch_requests_total", thinRequests)
	gauge("vhdsync_journal_pending_bytes", float64(j.PendingBytes))
	gauge("vhdsync_journal_pending_records", float64(j.PendingRecords))
	gauge("vhdsync_journal_cap_bytes", float64(j.MaxBytes))
	gauge("vhdsync_journal_disk_bytes", float64(j.DiskBytes))
	gauge("vhdsync_journal_blocked_writers", float64(j.BlockedWriters))
	gauge("vhdsync_journal_image_backed_records", float64(j.ImageBacked))
	counter("vhdsync_journal_captures_total", j.Captures)
	counter("vhdsync_journal_captured_bytes_total", j.CapturedBytes)
	counter("vhdsync_journal_binds_total", j.Binds)
	gauge("vhdsync_journal_open_epoch", float64(j.OpenEpoch))
	counter("vhdsync_journal_epochs_closed_total", j.EpochsClosed)

	counter("vhdsync_remote_requests_total", f.PutCalls, "put")
	counter("vhdsync_remote_requests_total", f.ClearCalls, "clear")
	counter("vhdsync_remote_requests_total", f.SequenceCalls, "sequence")
	counter("vhdsync_remote_bytes_total", f.BytesSent, "put")
	counter("vhdsync_remote_bytes_total", f.BytesCleared, "clear")
	counter("vhdsync_remote_filled_bytes_total", f.FilledBytes)
	counter("vhdsync_remote_retries_total", f.Retries)
	counter("vhdsync_remote_throttled_total", f.Throttled)
	gauge("vhdsync_remote_in_flight_limit", float64(f.InFlightLimit))
	gauge("vhdsync_blob_sequence_number", float64(f.RemoteSequence))
	gauge("vhdsync_blob_epoch", float64(f.RemoteEpoch))
	consistent := 1.0
	if remote.Sequence(f.RemoteSequence).InProgress() {
		consistent = 0
	}
	gauge("vhdsync_blob_consistent", consistent)
	for _, st := range flusherStates {
		v := 0.0
		if f.State == st {
			v = 1
		}
		gauge("vhdsync_flusher_state", v, string(st))
	}
	counter("vhdsync_flusher_batches_total", f.Batches)
	counter("vhdsync_flusher_drained_bytes_total", f.DrainedBytes)
	counter("vhdsync_flusher_preempted_batches_total", f.PreemptedBatches)
	counter("vhdsync_staged_segments_total", f.Segments)
	counter("vhdsync_staged_data_bytes_total", f.StagedDataBytes)

	if fc := c.fuse; fc != nil {
		counter("vhdsync_fuse_operations_total", fc.Reads.Load(), "read")
		counter("vhdsync_fuse_operations_total", fc.Writes.Load(), "write")
		counter("vhdsync_fuse_operations_total", fc.Fsyncs.Load(), "fsync")
		counter("vhdsync_fuse_operations_total", fc.Discards.Load(), "discard")
		counter("vhdsync_fuse_operations_total", fc.ZeroRanges.Load(), "zero_range")
		counter("vhdsync_fuse_bytes_total", fc.BytesRead.Load(), "read")
		counter("vhdsync_fuse_bytes_total", fc.BytesWritten.Load(), "write")
		counter("vhdsync_fuse_refused_total", fc.Refused.Load())
	}

	var ps points.RecoveryPointStats
	enabled := 0.0
	if c.points != nil {
		ps, enabled = c.points.Stats(), 1
	}
	gauge("vhdsync_recovery_points_enabled", enabled)
	gauge("vhdsync_recovery_points", float64(ps.Count))
	counter("vhdsync_recovery_points_taken_total", ps.Taken)
	counter("vhdsync_recovery_points_deleted_total", ps.Deleted)
	counter("vhdsync_recovery_points_failed_total", ps.Failures)
	last := 0.0
	if !ps.LastTime.IsZero() {
		last = float64(ps.LastTime.UnixNano()) / 1e9
	}
	gauge("vhdsync_recovery_point_last_timestamp_seconds", last)
}
