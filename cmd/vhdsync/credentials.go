package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// credentialsDirEnv is where systemd's LoadCredential= puts a service's
// credentials (a private, read-only directory that lives as long as the
// service): the unit names the files, vhdsync reads them, and no secret
// ever appears on a command line or in the unit's environment.
const credentialsDirEnv = "CREDENTIALS_DIRECTORY"

// credentialFiles maps each environment variable that may carry a secret
// to the file in $CREDENTIALS_DIRECTORY that stands in for it. The names
// are the credential ids of dist/systemd/vhdsync@.service.
var credentialFiles = map[string]string{
	"VHDSYNC_SAS":                     "sas",
	"AZURE_STORAGE_KEY":               "storage-key",
	"AZURE_STORAGE_CONNECTION_STRING": "connection-string",
	stagingEnv:                        "staging",
}

// credentialPrefix is what LoadCredential=vhdsync:DIR puts before the name
// of each file of DIR (the unit loads the instance's whole directory).
const credentialPrefix = "vhdsync_"

// withCredentials returns env extended by the credentials directory: a
// variable of credentialFiles that env leaves empty takes the content of
// its file, NAME or vhdsync_NAME (surrounding white space trimmed). A variable set in the
// environment wins, so a one-off override needs no edit of the files. The
// files are read once, here: a file that cannot be read (other than
// missing or empty) is an error, never a silent fall-through to the next
// credential source.
func withCredentials(env func(string) string) (func(string) string, error) {
	dir := env(credentialsDirEnv)
	if dir == "" {
		return env, nil
	}
	creds := map[string]string{}
	for key, name := range credentialFiles {
		for _, file := range []string{name, credentialPrefix + name} {
			b, err := os.ReadFile(filepath.Join(dir, file))
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read credential %q from $%s (%s): %w", file, credentialsDirEnv, dir, err)
			}
			if v := strings.TrimSpace(string(b)); v != "" {
				creds[key] = v
				break
			}
		}
	}
	if len(creds) == 0 {
		return env, nil
	}
	return func(key string) string {
		if v := env(key); v != "" {
			return v
		}
		return creds[key]
	}, nil
}
