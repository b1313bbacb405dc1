package main

// Running vhdsync as a service, without a mount: the systemd unit checked
// by systemd-analyze, the credentials directory feeding the credential
// chain, the mount(8) helper forms mapped to command lines, and the
// --metrics address.

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

const unitPath = "../../dist/systemd/vhdsync@.service"

// TestSystemdUnitVerifies runs `systemd-analyze verify` on the shipped
// template unit (an instance of it), with the binary path pointed at an
// executable that exists here, and checks what the unit promises: notify
// readiness, the drain through `vhdsync unmount`, credentials through
// LoadCredential=, restart on failure. A broken copy must fail the same
// check, so the check is known to look.
func TestSystemdUnitVerifies(t *testing.T) {
	sa := testenv.RequireTool(t, "systemd-analyze", "apt-get install systemd")
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(unit)
	for _, want := range []string{
		"Type=notify",
		"ExecStart=/usr/local/bin/vhdsync mount --foreground --state %f ",
		"ExecStop=-/usr/local/bin/vhdsync unmount --timeout 25m ${MOUNTPOINT}",
		"LoadCredential=vhdsync:/etc/vhdsync/%i",
		"Restart=on-failure",
		"TimeoutStopSec=30min",
		"After=network-online.target",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	if strings.Contains(text, "--sas") || strings.Contains(text, "AZURE_STORAGE_KEY=") {
		t.Error("the unit puts a secret on a command line or in its environment")
	}
	// The flags the unit passes are the CLI's: a stop timeout longer than
	// the drain's give-up time.
	stop := unitSeconds(t, text, "TimeoutStopSec=")
	if stop <= 25*60 {
		t.Errorf("TimeoutStopSec %ds leaves no time after `unmount --timeout 25m`", stop)
	}
	if code, _, errOut := vhdsync(t, nil, "unmount", "--timeout", "25m", filepath.Join(t.TempDir(), "nothing")); code != ExitUsage || !strings.Contains(errOut, "not a vhdsync mount") {
		t.Errorf("unmount --timeout 25m as the unit runs it: exit %d %s", code, errOut)
	}

	exe, err := os.Executable() // an executable that exists, for verify's check
	if err != nil {
		t.Fatal(err)
	}
	check := func(unit string) (string, error) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "vhdsync@.service"), []byte(strings.ReplaceAll(unit, "/usr/local/bin/vhdsync", exe)), 0o644); err != nil {
			t.Fatal(err)
		}
		inst, err := exec.Command("systemd-escape", "--path", "/var/lib/vhdsync/data").Output()
		if err != nil {
			t.Fatalf("systemd-escape: %v", err)
		}
		name := "vhdsync@" + strings.TrimSpace(string(inst)) + ".service"
		cmd := exec.Command(sa, "verify", "--man=no", filepath.Join(dir, name))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err = cmd.Run()
		return out.String(), err
	}
	if out, err := check(text); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	broken := strings.Replace(text, "Restart=on-failure", "Restart=on-failure\nRestartForever=yes", 1)
	if out, _ := check(broken); !strings.Contains(out, "RestartForever") {
		t.Errorf("systemd-analyze verify did not notice an unknown key: %q", out)
	}
}

// unitSeconds reads a duration setting such as TimeoutStopSec=30min.
func unitSeconds(t *testing.T, unit, key string) int {
	t.Helper()
	for _, l := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(l, key); ok {
			d, err := time.ParseDuration(strings.Replace(v, "min", "m", 1))
			if err != nil {
				t.Fatalf("%s%s: %v", key, v, err)
			}
			return int(d.Seconds())
		}
	}
	t.Fatalf("the unit has no %s", key)
	return 0
}

// TestCredentialsDirectory: the files of $CREDENTIALS_DIRECTORY stand in
// for the secrets' environment variables (plain names, or vhdsync_NAME as
// LoadCredential=vhdsync:DIR makes them), the environment wins, and a file
// that cannot be read is an error, not a silent fall-through.
func TestCredentialsDirectory(t *testing.T) {
	dir := t.TempDir()
	write := func(name, v string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("sas", "sv=2024&sig=abc\n")
	write("vhdsync_storage-key", "  a2V5  \n")
	write("vhdsync_staging", "") // empty: as if absent
	base := map[string]string{credentialsDirEnv: dir, "AZURE_STORAGE_CONNECTION_STRING": "from-env"}
	env, err := withCredentials(func(k string) string { return base[k] })
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"VHDSYNC_SAS":                     "sv=2024&sig=abc",
		"AZURE_STORAGE_KEY":               "a2V5",
		"AZURE_STORAGE_CONNECTION_STRING": "from-env",
		stagingEnv:                        "",
		"HOME":                            "",
	} {
		if got := env(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "connection-string"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := withCredentials(func(k string) string { return base[k] }); err == nil || !strings.Contains(err.Error(), "connection-string") {
		t.Errorf("an unreadable credential file gave %v", err)
	}
	code, _, errOut := vhdsync(t, map[string]string{credentialsDirEnv: dir}, "status", "--state", dir)
	if code != ExitAuth || !strings.Contains(errOut, "read credential") {
		t.Errorf("a command with an unreadable credential: exit %d %s", code, errOut)
	}
}

// TestCredentialsDirectoryReachesAzure: a SAS and an account key from the
// credentials directory are what the commands authenticate with: signed
// with the wrong key they are refused (exit 3, the secret not shown),
// with the right one they work.
func TestCredentialsDirectoryReachesAzure(t *testing.T) {
	az := azurite.Start(t)
	dir := t.TempDir()
	url := az.BlobURL("disks", "creds.vhd")
	state := filepath.Join(dir, "state")
	if code, _, errOut := vhdsync(t, nil, "create", "--blob", url, "--size", "20MiB", "--state", state, "--create-container"); code != ExitOK {
		t.Fatalf("create: exit %d %s", code, errOut)
	}
	creds := filepath.Join(dir, "creds")
	if err := os.Mkdir(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	put := func(name, v string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(creds, name), []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := map[string]string{credentialsDirEnv: creds}

	bad := blobSAS(t, url, badKey, time.Hour)
	put("vhdsync_sas", bad)
	code, out, errOut := vhdsync(t, env, "verify", "--state", state)
	if code != ExitAuth || !strings.Contains(errOut, "SAS") {
		t.Errorf("verify with a bad SAS from the credentials directory: exit %d\n%s%s", code, out, errOut)
	}
	if _, sig, _ := strings.Cut(bad, "sig="); strings.Contains(out+errOut, sig) {
		t.Error("the SAS signature was printed")
	}
	put("vhdsync_sas", blobSAS(t, url, azurite.DevKey, time.Hour))
	if code, out, errOut := vhdsync(t, env, "verify", "--state", state); code != ExitOK || !strings.Contains(out, "identical") {
		t.Errorf("verify with the SAS from the credentials directory: exit %d\n%s%s", code, out, errOut)
	}

	put("storage-key", badKey)
	if code, _, errOut := vhdsync(t, env, "points", "--blob", url); code != ExitAuth || !strings.Contains(errOut, "AZURE_STORAGE_KEY") {
		t.Errorf("points with a wrong storage-key credential: exit %d %s", code, errOut)
	}
	put("storage-key", azurite.DevKey)
	if code, _, errOut := vhdsync(t, env, "points", "--blob", url); code != ExitOK {
		t.Errorf("points with the storage-key credential: exit %d %s", code, errOut)
	}
}

// TestMountHelperArgs: the forms mount(8) and umount(8) use become the
// vhdsync command lines they stand for; fstab options map to mount's
// flags, generic ones are dropped, dangerous ones refused with the way.
func TestMountHelperArgs(t *testing.T) {
	state := t.TempDir()
	creds := t.TempDir()
	var set map[string]string
	setenv := func(k, v string) error { set[k] = v; return nil }
	cases := []struct {
		name  string
		argv0 string
		args  []string
		want  []string // nil: nothing left to do (done)
		env   map[string]string
		err   string
	}{
		{"an ordinary command line", "vhdsync", []string{"status", "--state", state}, []string{"status", "--state", state}, nil, ""},
		{"no arguments", "/usr/local/bin/vhdsync", []string{}, []string{}, nil, ""},
		{"a directory that is a command's argument", "vhdsync", []string{"help", state}, []string{"help", state}, nil, ""},
		{"mount.fuse.vhdsync with fstab options", "/sbin/mount.fuse.vhdsync",
			[]string{state, "/mnt/d", "-o", "rw,_netdev,nofail,noatime,journal_cap=8GiB,recovery-points=15m,allow_other,metrics=9464,x-systemd.mount-timeout=30min,log_json,credentials=" + creds, "-t", "fuse.vhdsync"},
			[]string{"mount", "--state", state, "--journal-cap", "8GiB", "--recovery-points", "15m", "--allow-other", "--metrics", "9464", "--log-json", "/mnt/d"},
			map[string]string{credentialsDirEnv: creds}, ""},
		{"mount.fuse's form: the type's program", "vhdsync",
			[]string{state, "/mnt/d", "-o", "rw,dev,suid,linger=10ms,log_level=debug"},
			[]string{"mount", "--state", state, "--linger", "10ms", "--log-level", "debug", "/mnt/d"}, nil, ""},
		{"helper flags -n -v and -o glued", "mount.fuse.vhdsync",
			[]string{state, "/mnt/d", "-nv", "-oworkers=4"},
			[]string{"mount", "--state", state, "--workers", "4", "/mnt/d"}, nil, ""},
		{"fake mount", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-f", "-o", "linger=1s"}, nil, nil, ""},
		{"sloppy drops unknown options", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-s", "-o", "nosuchopt=1,keep=3"},
			[]string{"mount", "--state", state, "--keep", "3", "/mnt/d"}, nil, ""},
		{"unknown option", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "nosuchopt=1"}, nil, nil, "unknown mount option"},
		{"read-only", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "ro"}, nil, nil, "read-write"},
		{"a SAS in fstab", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "sas=sv=1"}, nil, nil, "credentials=DIR"},
		{"break-lease in fstab", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "break_lease"}, nil, nil, "by hand"},
		{"a staging URL with its SAS", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "transfer=staged,staging=http://h/c?sv=1&sig=x"}, nil, nil, "credentials directory"},
		{"a valued option without value", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "workers"}, nil, nil, "needs a value"},
		{"credentials not a directory", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-o", "credentials=/nonexistent"}, nil, nil, "not a directory"},
		{"another namespace", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-N", "1234"}, nil, nil, "namespace"},
		{"another type", "mount.fuse.vhdsync", []string{state, "/mnt/d", "-t", "fuse.sshfs"}, nil, nil, "fuse.vhdsync only"},
		{"missing mountpoint", "mount.fuse.vhdsync", []string{state}, nil, nil, "STATEDIR MOUNTPOINT"},
		{"umount helper", "/sbin/umount.fuse.vhdsync", []string{"/mnt/d", "-n", "-t", "fuse.vhdsync"}, []string{"unmount", "/mnt/d"}, nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			set = map[string]string{}
			got, done, err := mountHelperArgs(c.argv0, c.args, setenv)
			if done != (c.want == nil && c.err == "") {
				t.Errorf("done = %v", done)
			}
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("got %q, %v; want an error with %q", got, err, c.err)
				}
				if exitCode(err) != ExitUsage {
					t.Errorf("exit code %d for %v, want %d", exitCode(err), err, ExitUsage)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("got %q\nwant %q", got, c.want)
			}
			if c.env == nil {
				c.env = map[string]string{}
			}
			if !reflect.DeepEqual(set, c.env) {
				t.Errorf("environment set: %v, want %v", set, c.env)
			}
		})
	}
}

// TestMetricsListenAddr: a bare port or :PORT is loopback only.
func TestMetricsListenAddr(t *testing.T) {
	for in, want := range map[string]string{
		"9464":         "127.0.0.1:9464",
		":9464":        "127.0.0.1:9464",
		"0":            "127.0.0.1:0",
		"0.0.0.0:9464": "0.0.0.0:9464",
		"[::1]:9464":   "[::1]:9464",
		"myhost:80":    "myhost:80",
	} {
		if got, err := metricsListenAddr(in); err != nil || got != want {
			t.Errorf("%q: %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "abc", "70000", ":x", "1.2.3.4"} {
		if got, err := metricsListenAddr(in); err == nil || exitCode(err) != ExitUsage {
			t.Errorf("%q: %q, %v; want a usage error", in, got, err)
		}
	}
	if code, _, errOut := vhdsync(t, nil, "mount", "--help"); code != ExitOK || errOut != "" {
		t.Fatalf("mount --help: %d %s", code, errOut)
	}
	var out bytes.Buffer
	root := newRootCmd(&globals{stdout: &out, stderr: &out, env: func(string) string { return "" }})
	root.SetArgs([]string{"mount", "--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "--metrics ADDR") || !strings.Contains(out.String(), "127.0.0.1 only") {
		t.Errorf("mount --help does not explain --metrics:\n%s", out.String())
	}
}
