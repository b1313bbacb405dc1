package pageblob

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
)

// stagingPlaceholder stands in for a blob name while a container URL is
// parsed and its credentials chosen exactly as for a blob URL.
const stagingPlaceholder = "vhdsync-container-placeholder"

// OpenContainer prepares a client for the container at rawURL
// (https://ACCOUNT.blob.core.windows.net/CONTAINER[?SAS], or the emulator's
// http://HOST:PORT/ACCOUNT/CONTAINER), with the same credential chain as
// Open. It sends no request.
func OpenContainer(rawURL string, o *Options) (*container.Client, Location, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, Location{}, fmt.Errorf("%w: %v", ErrBadURL, redactErr(err))
	}
	u.Path = strings.TrimRight(u.Path, "/") + "/" + stagingPlaceholder
	c, err := Open(u.String(), o)
	if err != nil {
		return nil, Location{}, err
	}
	loc := c.Location()
	if loc.Blob != stagingPlaceholder {
		return nil, Location{}, fmt.Errorf("%w: %q is a blob URL; the staging location is a container: https://ACCOUNT.blob.core.windows.net/CONTAINER", ErrBadURL, Redact(rawURL))
	}
	loc.Blob = ""
	return c.cc, loc, nil
}
