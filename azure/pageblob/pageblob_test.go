package pageblob

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

func noEnv(string) string { return "" }

func TestParseLocation(t *testing.T) {
	l, err := ParseLocation("https://acct.blob.core.windows.net/disks/a/b.vhd?sv=2022&sig=SECRET%2B")
	if err != nil {
		t.Fatal(err)
	}
	if l.Account != "acct" || l.Container != "disks" || l.Blob != "a/b.vhd" || l.SAS == "" || l.IPStyle {
		t.Fatalf("%+v", l)
	}
	if strings.Contains(l.URL(), "SECRET") {
		t.Fatalf("URL() leaks the SAS: %s", l.URL())
	}
	if r := Redact("https://acct.blob.core.windows.net/c/b?sv=1&sig=SECRET"); strings.Contains(r, "SECRET") {
		t.Fatalf("Redact leaks: %s", r)
	}
	l, err = ParseLocation("http://127.0.0.1:10000/devstoreaccount1/disks/disk.vhd")
	if err != nil || !l.IsEmulator() || l.Account != "devstoreaccount1" || l.URL() != "http://127.0.0.1:10000/devstoreaccount1/disks/disk.vhd" {
		t.Fatalf("%+v %v", l, err)
	}
	for _, bad := range []string{"ftp://x/y/z", "https://acct.blob.core.windows.net/onlycontainer", "http://127.0.0.1:1/acct/c", "https://a.blob.core.windows.net/disks/b?foo=bar",
		"https://a.blob.core.windows.net/c/b", "https://a.blob.core.windows.net/Disks/b", "https://a.blob.core.windows.net/di--sks/b", "https://a.blob.core.windows.net/-disks/b"} {
		if _, err := ParseLocation(bad); !errors.Is(err, ErrBadURL) {
			t.Errorf("%q: want ErrBadURL, got %v", bad, err)
		}
	}
}

// TestCRC64MatchesService proves our CRC64 is the one the service checks:
// Azurite accepts pages sent with it and refuses the same pages with a
// CRC that differs in one bit.
func TestCRC64MatchesService(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	c := newBlob(t, s, "crc.vhd", noEnv)
	size := 20 * vhdlayer.MiB
	if err := c.Create(ctx, size, vhdlayer.NewFixedFooter(size, time.Now()).Encode(), CreateOptions{CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("vhdsync!"), 8192)
	if err := c.putPages(ctx, 0, data, "", CRC64(data)); err != nil {
		t.Fatalf("correct CRC refused: %v", err)
	}
	err := c.putPages(ctx, 65536, data, "", CRC64(data)^1)
	if err == nil || !strings.Contains(err.Error(), "Crc64Mismatch") {
		t.Fatalf("wrong CRC: want Crc64Mismatch, got %v", err)
	}
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, got, 65536); err != nil || !bytes.Equal(got, make([]byte, len(data))) {
		t.Fatalf("refused pages must not land: %v", err)
	}
}

func newBlob(t *testing.T, s *azurite.Server, name string, env func(string) string) *Client {
	t.Helper()
	c, err := Open(s.BlobURL("disks", name), &Options{Env: env})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCreateAgainstAzurite(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	c := newBlob(t, s, "d1.vhd", noEnv)
	size := 20 * vhdlayer.MiB
	footer := vhdlayer.NewFixedFooter(size, time.Now()).Encode()

	// The container does not exist yet.
	if err := c.Create(ctx, size, footer, CreateOptions{}); !errors.Is(err, ErrContainerNotFound) || !strings.Contains(err.Error(), "--create-container") {
		t.Fatalf("missing container: %v", err)
	}
	if err := c.Create(ctx, size, footer, CreateOptions{CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	info, err := c.OpenVHD(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Props.Length != int64(size)+512 || info.Raw != footer {
		t.Fatalf("blob length %d, footer equal %v", info.Props.Length, info.Raw == footer)
	}

	// Write a page, then a second create without --overwrite must fail and
	// leave both the footer and the page as they were.
	page := bytes.Repeat([]byte{0xab}, 4096)
	if err := c.PutPages(ctx, 1<<20, page, ""); err != nil {
		t.Fatal(err)
	}
	other := vhdlayer.NewFixedFooter(40*vhdlayer.MiB, time.Now()).Encode()
	err = c.Create(ctx, 40*vhdlayer.MiB, other, CreateOptions{CreateContainer: true})
	if !errors.Is(err, ErrBlobExists) || !strings.Contains(err.Error(), "--overwrite") {
		t.Fatalf("second create: %v", err)
	}
	info2, err := c.OpenVHD(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if info2.Raw != footer || info2.Props.Length != info.Props.Length || !bytes.Equal(got, page) {
		t.Fatal("a refused create modified the blob")
	}
	// With Overwrite it is replaced.
	if err := c.Create(ctx, 40*vhdlayer.MiB, other, CreateOptions{Overwrite: true}); err != nil {
		t.Fatal(err)
	}
	if info3, err := c.OpenVHD(ctx); err != nil || info3.Raw != other {
		t.Fatalf("overwrite: %v", err)
	}
	// Put Page limits are ours to enforce.
	if err := c.PutPages(ctx, 0, make([]byte, MaxPutPage+512), ""); err == nil {
		t.Fatal("a Put Page over 4 MiB must be refused locally")
	}
	if err := c.PutPages(ctx, 100, make([]byte, 512), ""); err == nil {
		t.Fatal("an unaligned Put Page must be refused locally")
	}
}

func TestErrorsAgainstAzurite(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	good := newBlob(t, s, "good.vhd", noEnv)
	size := 20 * vhdlayer.MiB
	if err := good.Create(ctx, size, vhdlayer.NewFixedFooter(size, time.Now()).Encode(), CreateOptions{CreateContainer: true}); err != nil {
		t.Fatal(err)
	}

	// Wrong key.
	badKey := func(k string) string {
		if k == "AZURE_STORAGE_KEY" {
			return "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk="
		}
		return ""
	}
	bad := newBlob(t, s, "good.vhd", badKey)
	if bad.AuthMethod() != "AZURE_STORAGE_KEY" {
		t.Fatalf("auth method %q", bad.AuthMethod())
	}
	if _, err := bad.OpenVHD(ctx); !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "check the credentials") {
		t.Fatalf("bad key: %v", err)
	}
	// Bad SAS.
	sasClient, err := Open(s.BlobURL("disks", "good.vhd")+"?sv=2023-01-03&sp=r&sr=b&se=2030-01-01T00:00:00Z&sig=bm90IGEgc2lnbmF0dXJl", &Options{Env: noEnv})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sasClient.OpenVHD(ctx); !errors.Is(err, ErrAuth) || strings.Contains(err.Error(), "bm90IGEgc2lnbmF0dXJl") {
		t.Fatalf("bad SAS (must fail as auth and never print the signature): %v", err)
	}
	// Connection string for another account.
	cs := func(k string) string {
		if k == "AZURE_STORAGE_CONNECTION_STRING" {
			return "DefaultEndpointsProtocol=http;AccountName=other;AccountKey=" + azurite.DevKey
		}
		return ""
	}
	if _, err := Open(s.BlobURL("disks", "good.vhd"), &Options{Env: cs}); !errors.Is(err, ErrAuth) {
		t.Fatalf("connection string of another account: %v", err)
	}
	// Connection string with the right account works.
	csOK := func(k string) string {
		if k == "AZURE_STORAGE_CONNECTION_STRING" {
			return "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + azurite.DevKey + ";BlobEndpoint=" + s.Endpoint
		}
		return ""
	}
	if c, err := Open(s.BlobURL("disks", "good.vhd"), &Options{Env: csOK}); err != nil {
		t.Fatal(err)
	} else if _, err := c.OpenVHD(ctx); err != nil {
		t.Fatalf("connection string: %v", err)
	}

	// Missing blob and missing container are told apart.
	if _, err := newBlob(t, s, "nope.vhd", noEnv).OpenVHD(ctx); !errors.Is(err, ErrBlobNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	nc, _ := Open(s.BlobURL("nocontainer", "x.vhd"), &Options{Env: noEnv})
	if _, err := nc.OpenVHD(ctx); !errors.Is(err, ErrContainerNotFound) {
		t.Fatalf("missing container: %v", err)
	}

	// A block blob is not a page blob.
	bb, err := blockblob.NewClientWithSharedKeyCredential(s.BlobURL("disks", "block.vhd"), mustKey(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bb.UploadBuffer(ctx, make([]byte, 1024), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := newBlob(t, s, "block.vhd", noEnv).OpenVHD(ctx); !errors.Is(err, ErrNotPageBlob) {
		t.Fatalf("block blob: %v", err)
	}

	// A page blob that is not a VHD, and one whose footer disagrees with its length.
	plain := newBlob(t, s, "plain.vhd", noEnv)
	if _, err := plain.pb.Create(ctx, int64(size)+512, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := plain.OpenVHD(ctx); !errors.Is(err, ErrNotFixedVHD) || !errors.Is(err, vhdlayer.ErrNotVHD) {
		t.Fatalf("zero page blob: %v", err)
	}
	mism := newBlob(t, s, "mismatch.vhd", noEnv)
	f := vhdlayer.NewFixedFooter(size, time.Now()).Encode()
	if err := mism.Create(ctx, size+vhdlayer.MiB, f, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mism.OpenVHD(ctx); !errors.Is(err, vhdlayer.ErrSizeMismatch) {
		t.Fatalf("size mismatch: %v", err)
	}
}

func mustKey(t *testing.T) *blob.SharedKeyCredential {
	k, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
