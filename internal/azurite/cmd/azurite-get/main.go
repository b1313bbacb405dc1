// Command azurite-get downloads a whole blob from Azurite with the official
// Azure SDK and the emulator's development account, independently of
// vhdsync's own code, so the demo can show the blob to qemu-img as any other
// client would see it.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/vhdsync/vhdsync/internal/azurite"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: azurite-get BLOB-URL FILE")
		os.Exit(2)
	}
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	c, err := blob.NewClientWithSharedKeyCredential(os.Args[1], cred, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	f, err := os.Create(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	n, err := c.DownloadFile(context.Background(), f, nil)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "azurite-get: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("downloaded %d bytes to %s\n", n, os.Args[2])
}
