// Package staging is the staging container of the staged transfer: one
// disk's segments live under the prefix "<disk id>/" of an Azure block-blob
// container, next to two lock blobs whose leases make sure one daemon
// stages and one worker applies for each disk.
package staging

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/staged"
)

// Lock names: the daemon that stages a disk holds Writer, the worker that
// applies it holds Worker.
const (
	Writer = "writer"
	Worker = "worker"
)

// Store is one disk's part of a staging container. It implements
// staged.SegmentStore.
type Store struct {
	cc     *container.Client
	loc    pageblob.Location
	prefix string
}

var _ staged.SegmentStore = (*Store)(nil)

// Open prepares the store for disk diskID in the container at rawURL,
// with the same credentials rules as a blob URL. It sends no request.
func Open(rawURL, diskID string, o *pageblob.Options) (*Store, error) {
	if diskID == "" {
		return nil, errors.New("staging: empty disk id")
	}
	cc, loc, err := pageblob.OpenContainer(rawURL, o)
	if err != nil {
		return nil, err
	}
	return &Store{cc: cc, loc: loc, prefix: diskID + "/"}, nil
}

// URL is the container's URL, without any SAS.
func (s *Store) URL() string { return s.loc.ContainerURL() }

// Prefix is the disk's prefix inside the container.
func (s *Store) Prefix() string { return s.prefix }

func (s *Store) wrap(what string, err error) error {
	if err == nil {
		return nil
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) && (re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusUnauthorized) {
		return fmt.Errorf("%s in staging container %s: %w (HTTP %d %s): the credentials need read, write, list and delete rights on the container; a SAS in the --staging URL, AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY or Entra ID", what, s.URL(), pageblob.ErrAuth, re.StatusCode, re.ErrorCode)
	}
	if bloberror.HasCode(err, bloberror.ContainerNotFound) {
		return fmt.Errorf("%s in staging container %s: %w: the container does not exist; create it (az storage container create), or let `vhdsync mount --transfer staged` create it", what, s.URL(), pageblob.ErrContainerNotFound)
	}
	// Keep the response error reachable: remote.IsTransient decides on
	// retries from its status code.
	return fmt.Errorf("%s in staging container %s: %w", what, s.URL(), pageblob.RedactErr(err))
}

// EnsureContainer creates the container if it does not exist.
func (s *Store) EnsureContainer(ctx context.Context) error {
	_, err := s.cc.Create(ctx, nil)
	if err == nil || bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		return nil
	}
	return s.wrap("create the container", err)
}

// PutSegment implements staged.SegmentStore: one Put Blob with a CRC-64
// the service checks.
func (s *Store) PutSegment(ctx context.Context, name string, data []byte) error {
	bc := s.cc.NewBlockBlobClient(s.prefix + name)
	_, err := bc.Upload(ctx, nopCloser{bytes.NewReader(data)}, &blockblob.UploadOptions{
		TransactionalValidation: blob.TransferValidationTypeCRC64(pageblob.CRC64(data)),
		HTTPHeaders:             &blob.HTTPHeaders{BlobContentType: to.Ptr("application/vnd.vhdsync.segment")},
	})
	return s.wrap("store segment "+name, err)
}

// ListSegments implements staged.SegmentStore.
func (s *Store) ListSegments(ctx context.Context) ([]string, error) {
	pfx := s.prefix + "seg-"
	pager := s.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Prefix: &pfx})
	var out []string
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, s.wrap("list segments", err)
		}
		for _, it := range page.Segment.BlobItems {
			if it.Name != nil {
				out = append(out, strings.TrimPrefix(*it.Name, s.prefix))
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// GetSegment implements staged.SegmentStore.
func (s *Store) GetSegment(ctx context.Context, name string) ([]byte, error) {
	resp, err := s.cc.NewBlobClient(s.prefix+name).DownloadStream(ctx, nil)
	if err != nil {
		return nil, s.wrap("read segment "+name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, s.wrap("read segment "+name, err)
	}
	return b, nil
}

// DeleteSegment implements staged.SegmentStore.
func (s *Store) DeleteSegment(ctx context.Context, name string) error {
	_, err := s.cc.NewBlobClient(s.prefix+name).Delete(ctx, nil)
	if err == nil || bloberror.HasCode(err, bloberror.BlobNotFound) {
		return nil
	}
	return s.wrap("delete segment "+name, err)
}

func (s *Store) lockClient(which, id string) (*lease.BlobClient, *blockblob.Client, error) {
	bc := s.cc.NewBlockBlobClient(s.prefix + which + ".lock")
	lc, err := lease.NewBlobClient(bc, &lease.BlobClientOptions{LeaseID: &id})
	return lc, bc, err
}

// ErrLocked: another daemon or worker holds the disk's lock.
var ErrLocked = errors.New("another process holds this disk's staging lock")

// AcquireLock takes the lock blob which (Writer or Worker) with an
// infinite lease of id; taking it again with the same id succeeds, so the
// same daemon or worker gets it back after a crash. With breakLock a
// stranger's lease is broken first.
func (s *Store) AcquireLock(ctx context.Context, which, id string, breakLock bool) error {
	lc, bc, err := s.lockClient(which, id)
	if err != nil {
		return fmt.Errorf("lock %s: %w", which, err)
	}
	_, err = bc.Upload(ctx, nopCloser{bytes.NewReader(nil)}, &blockblob.UploadOptions{
		AccessConditions: &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: to.Ptr(azcore.ETagAny)}},
	})
	// 409 or 412: the lock blob exists already (leased or not).
	var re *azcore.ResponseError
	if err != nil && (!errors.As(err, &re) || re.StatusCode != http.StatusConflict && re.StatusCode != http.StatusPreconditionFailed) {
		return s.wrap("create lock "+which, err)
	}
	_, err = lc.AcquireLease(ctx, -1, nil)
	if err != nil && breakLock && bloberror.HasCode(err, bloberror.LeaseAlreadyPresent) {
		if _, berr := lc.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: to.Ptr(int32(0))}); berr != nil {
			return s.wrap("break lock "+which, berr)
		}
		_, err = lc.AcquireLease(ctx, -1, nil)
	}
	if bloberror.HasCode(err, bloberror.LeaseAlreadyPresent) {
		return fmt.Errorf("%w: the %s lock %s%s.lock in %s is held by another %s; stop it, or pass --break-lease if you are sure it is gone", ErrLocked, which, s.prefix, which, s.URL(), map[string]string{Writer: "vhdsync mount", Worker: "vhdsync apply"}[which])
	}
	return s.wrap("lock "+which, err)
}

// ReleaseLock gives the lock up.
func (s *Store) ReleaseLock(ctx context.Context, which, id string) error {
	lc, _, err := s.lockClient(which, id)
	if err != nil {
		return fmt.Errorf("unlock %s: %w", which, err)
	}
	_, err = lc.ReleaseLease(ctx, nil)
	return s.wrap("unlock "+which, err)
}

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }
