package writeback

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vhdsync/vhdsync/azure/pageblob"
)

// This file holds the test transports shared by the Azurite tests: an
// azcore policy.Transporter that forwards to a real HTTP client, records
// every request it sees (the headers that matter for the Azure rules, the
// status and the sequence number the service reports) and can inject
// faults before or after forwarding.

// wireFault is what the transport does to one request.
type wireFault int

const (
	wireOK       wireFault = iota
	wire503                // answer 503 ServerBusy without forwarding
	wireTimeout            // return a net timeout error without forwarding
	wireHang               // wait until the per-try deadline fires, without forwarding
	wireLost               // forward, then drop the response: connection reset
	wireRefused            // return connection refused without forwarding
	wireHold               // keep the request for a later re-send, answer a timeout
	wire500                // answer 500 OperationTimedOut without forwarding
	wireDeadPort           // forward to a loopback port nobody listens on
)

func (f wireFault) String() string {
	return [...]string{"none", "503", "timeout", "hang", "lost", "refused", "hold", "500", "deadport"}[f]
}

// wireReq is what the transport saw of one request.
type wireReq struct {
	N           int // order of arrival
	Method      string
	Comp        string // comp= query parameter
	Range       string // Range or x-ms-range header
	Off, End    int64  // parsed range, End inclusive; -1 when absent
	PageWrite   string // x-ms-page-write
	ContentLen  int64
	LeaseID     string
	LeaseAction string
	IfSeqEq     string // x-ms-if-sequence-number-eq ("" when absent)
	SeqNum      string // x-ms-blob-sequence-number of the request
	SeqAction   string // x-ms-sequence-number-action
	CRC64       string // x-ms-content-crc64 (base64)
	CRCOK       bool   // the CRC64 header is the CRC64 of the body
	Fault       wireFault
	Forwarded   bool // it reached Azurite
	Status      int  // the service's status (0 when it never answered)
	ErrCode     string
	RespSeq     int64 // x-ms-blob-sequence-number of the response, -1 when absent
	SeqAtApply  int64 // for an applied put/clear: the blob's sequence number as tracked
	Err         string
}

// kind names the operation: put, clear, seq, lease, props, read, create, other.
func (r wireReq) kind() string {
	switch {
	case r.Method == http.MethodPut && r.Comp == "page" && strings.EqualFold(r.PageWrite, "update"):
		return "put"
	case r.Method == http.MethodPut && r.Comp == "page" && strings.EqualFold(r.PageWrite, "clear"):
		return "clear"
	case r.Method == http.MethodPut && r.Comp == "properties" && r.SeqAction != "":
		return "seq"
	case r.Comp == "lease":
		return "lease"
	case r.Method == http.MethodHead:
		return "props"
	case r.Method == http.MethodGet:
		return "read"
	case r.Method == http.MethodPut && r.Comp == "":
		return "create"
	}
	return "other"
}

// applied reports whether the service carried the request out.
func (r wireReq) applied() bool { return r.Forwarded && r.Status >= 200 && r.Status < 300 }

// hdr reads a header whatever its spelling: the generated azblob code sets
// non-canonical keys (Header["x-ms-lease-id"]) that Header.Get misses.
func wireHeader(h http.Header, name string) string {
	if v, ok := h[name]; ok && len(v) > 0 {
		return v[0]
	}
	if v := h.Get(name); v != "" {
		return v
	}
	for k, v := range h {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// wireRange parses "bytes=a-b".
func wireRange(s string) (int64, int64) {
	s = strings.TrimPrefix(s, "bytes=")
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return -1, -1
	}
	x, err1 := strconv.ParseInt(a, 10, 64)
	y, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil {
		return -1, -1
	}
	return x, y
}

// wireHeld is a request kept by wireHold, to be sent again later.
type wireHeld struct {
	info wireReq
	req  *http.Request
	body []byte
}

// wireTransport is the recording, fault-injecting transport.
type wireTransport struct {
	client *http.Client

	mu      sync.Mutex
	reqs    []wireReq // in the order they completed
	arrived int       // requests seen so far (numbers them)
	// choose, when set, picks the wireFault for a request (called under mu,
	// so it may use an unsynchronized RNG).
	choose func(r *wireReq) wireFault
	held   []wireHeld
	// Shadow model of the blob, fed by every applied put and clear, and
	// the blob's sequence number as applied sequence updates report it.
	shadow  []byte
	blobSeq int64
	// onSeq, when set, is called (under mu) after every applied sequence
	// update, with the shadow and the new sequence number.
	onSeq func(shadow []byte, seq int64)
	// deadAddr is a loopback address nobody listens on (wireDeadPort).
	deadAddr string
	// hold, when set, keeps matching requests waiting (see setHold).
	hold    func(r *wireReq) bool
	cond    *sync.Cond
	waiting map[*wireReq]bool
}

func newWireTransport() *wireTransport {
	t := &wireTransport{client: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}}
	t.cond = sync.NewCond(&t.mu)
	t.waiting = map[*wireReq]bool{}
	if l, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		t.deadAddr = l.Addr().String()
		l.Close()
	}
	return t
}

// withShadow makes the transport keep a model of a blob of n bytes.
func (t *wireTransport) withShadow(n int64) *wireTransport {
	t.shadow = make([]byte, n)
	return t
}

func (t *wireTransport) setChoose(f func(r *wireReq) wireFault) {
	t.mu.Lock()
	t.choose = f
	t.mu.Unlock()
}

// requests returns a copy of what was recorded.
func (t *wireTransport) requests() []wireReq {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]wireReq(nil), t.reqs...)
}

// Do implements policy.Transporter.
func (t *wireTransport) Do(req *http.Request) (*http.Response, error) {
	info := wireReq{
		Method:      req.Method,
		Comp:        req.URL.Query().Get("comp"),
		PageWrite:   wireHeader(req.Header, "x-ms-page-write"),
		LeaseID:     wireHeader(req.Header, "x-ms-lease-id"),
		LeaseAction: wireHeader(req.Header, "x-ms-lease-action"),
		IfSeqEq:     wireHeader(req.Header, "x-ms-if-sequence-number-eq"),
		SeqNum:      wireHeader(req.Header, "x-ms-blob-sequence-number"),
		SeqAction:   wireHeader(req.Header, "x-ms-sequence-number-action"),
		CRC64:       wireHeader(req.Header, "x-ms-content-crc64"),
		RespSeq:     -1,
		SeqAtApply:  -1,
	}
	info.Range = wireHeader(req.Header, "x-ms-range")
	if info.Range == "" {
		info.Range = wireHeader(req.Header, "Range")
	}
	info.Off, info.End = wireRange(info.Range)
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, err
		}
	}
	info.ContentLen = int64(len(body))
	if info.CRC64 != "" {
		if raw, err := base64.StdEncoding.DecodeString(info.CRC64); err == nil && len(raw) == 8 {
			info.CRCOK = binary.LittleEndian.Uint64(raw) == pageblob.CRC64(body)
		}
	}
	out := req.Clone(req.Context())
	out.Body = io.NopCloser(bytes.NewReader(body))
	out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	out.ContentLength = int64(len(body))
	if len(body) == 0 {
		out.Body, out.GetBody = http.NoBody, nil
	}

	t.mu.Lock()
	info.N = t.arrived
	t.arrived++
	if t.choose != nil {
		info.Fault = t.choose(&info)
	}
	if info.Fault == wireHold {
		t.held = append(t.held, wireHeld{info: info, req: req.Clone(context.Background()), body: body})
	}
	if t.hold != nil && t.hold(&info) {
		stop := context.AfterFunc(req.Context(), func() {
			t.mu.Lock()
			t.cond.Broadcast()
			t.mu.Unlock()
		})
		t.waiting[&info] = true
		for t.hold != nil && t.hold(&info) && req.Context().Err() == nil {
			t.cond.Wait()
		}
		delete(t.waiting, &info)
		stop()
	}
	t.mu.Unlock()

	var resp *http.Response
	var err error
	switch info.Fault {
	case wire503:
		resp = serviceError(req, http.StatusServiceUnavailable, "ServerBusy")
	case wire500:
		resp = serviceError(req, http.StatusInternalServerError, "OperationTimedOut")
	case wireTimeout, wireHold:
		err = &net.OpError{Op: "read", Net: "tcp", Err: wireTimeoutErr{}}
	case wireHang:
		<-req.Context().Done()
		err = req.Context().Err()
	case wireDeadPort:
		// The real HTTP client fails to connect: its error (a *url.Error)
		// names the request URL, query and all.
		out.URL.Host = t.deadAddr
		resp, err = t.client.Do(out)
	case wireRefused:
		err = &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	default:
		info.Forwarded = true
		resp, err = t.client.Do(out)
	}

	if info.Forwarded && err == nil {
		info.Status = resp.StatusCode
		info.ErrCode = resp.Header.Get("x-ms-error-code")
		if v := resp.Header.Get("x-ms-blob-sequence-number"); v != "" {
			info.RespSeq, _ = strconv.ParseInt(v, 10, 64)
		}
		if info.Fault == wireLost {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			resp = nil
			err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
		}
	}
	if err != nil {
		info.Err = err.Error()
	}
	t.mu.Lock()
	t.track(&info, body)
	t.reqs = append(t.reqs, info)
	t.mu.Unlock()
	return resp, err
}

// track updates the shadow blob and sequence number from an applied
// request (under mu).
func (t *wireTransport) track(info *wireReq, body []byte) {
	if !info.applied() {
		return
	}
	switch info.kind() {
	case "put", "clear":
		info.SeqAtApply = t.blobSeq
		if t.shadow != nil && info.Off >= 0 && info.End < int64(len(t.shadow)) {
			if info.kind() == "put" {
				copy(t.shadow[info.Off:info.End+1], body)
			} else {
				clear(t.shadow[info.Off : info.End+1])
			}
		}
	case "seq":
		if info.RespSeq >= 0 {
			t.blobSeq = info.RespSeq
			if t.onSeq != nil {
				t.onSeq(t.shadow, info.RespSeq)
			}
		}
	}
}

// resendHeld sends every held request again, now, exactly as it was
// signed, and returns what the service answered.
func (t *wireTransport) resendHeld(ctx context.Context) ([]wireReq, error) {
	t.mu.Lock()
	held := t.held
	t.held = nil
	t.mu.Unlock()
	var out []wireReq
	for _, h := range held {
		r := h.req.Clone(ctx)
		r.Body = io.NopCloser(bytes.NewReader(h.body))
		r.ContentLength = int64(len(h.body))
		info := h.info
		info.Fault = wireOK
		info.Forwarded = true
		resp, err := t.client.Do(r)
		if err != nil {
			return out, fmt.Errorf("re-send held request: %w", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		info.Status = resp.StatusCode
		info.ErrCode = resp.Header.Get("x-ms-error-code")
		t.mu.Lock()
		info.N = t.arrived
		t.arrived++
		t.track(&info, h.body)
		t.reqs = append(t.reqs, info)
		t.mu.Unlock()
		out = append(out, info)
	}
	return out, nil
}

// serviceError is a storage error response made up by the transport.
func serviceError(req *http.Request, status int, code string) *http.Response {
	return &http.Response{
		StatusCode: status, Status: fmt.Sprintf("%d %s", status, code),
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header:  http.Header{"X-Ms-Error-Code": {code}, "Content-Type": {"application/xml"}},
		Body:    io.NopCloser(strings.NewReader(`<?xml version="1.0" encoding="utf-8"?><Error><Code>` + code + `</Code><Message>injected</Message></Error>`)),
		Request: req,
	}
}

// wireTimeoutErr is a network timeout (net.Error with Timeout() true).
type wireTimeoutErr struct{}

func (wireTimeoutErr) Error() string   { return "i/o timeout (injected)" }
func (wireTimeoutErr) Timeout() bool   { return true }
func (wireTimeoutErr) Temporary() bool { return true }

// setHold makes requests for which hold returns true wait until a later
// setHold no longer holds them (nil lets everything through).
func (t *wireTransport) setHold(hold func(r *wireReq) bool) {
	t.mu.Lock()
	t.hold = hold
	t.cond.Broadcast()
	t.mu.Unlock()
}

// waitingCount is how many requests wait in setHold and match pred (all
// when pred is nil).
func (t *wireTransport) waitingCount(pred func(r *wireReq) bool) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for r := range t.waiting {
		if pred == nil || pred(r) {
			n++
		}
	}
	return n
}

// isWrite is a hold predicate: put, clear and sequence updates.
func isWrite(r *wireReq) bool {
	k := r.kind()
	return k == "put" || k == "clear" || k == "seq"
}
