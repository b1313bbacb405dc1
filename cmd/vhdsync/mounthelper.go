package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// The mount(8) helper forms. An /etc/fstab line of type fuse.vhdsync, or
// `mount -t fuse.vhdsync STATEDIR MOUNTPOINT -o OPTS`, reaches vhdsync in
// one of two ways:
//
//   - /sbin/mount.fuse.vhdsync (a symlink to the binary, `make
//     install-service`): mount(8) runs
//     `mount.fuse.vhdsync STATEDIR MOUNTPOINT [-sfnv] [-N NS] -o OPTS [-t fuse.vhdsync]`;
//   - without it, mount(8) runs fuse3's /sbin/mount.fuse, which runs the
//     type's program from root's PATH: `vhdsync STATEDIR MOUNTPOINT -o OPTS`.
//
// umount(8) runs /sbin/umount.fuse.vhdsync (another symlink) as
// `umount.fuse.vhdsync MOUNTPOINT [-flnrv] [-N NS] [-t fuse.vhdsync]`, so a
// plain umount (and systemd stopping an fstab mount) waits for the drain as
// `vhdsync unmount` does.
const (
	mountHelperName  = "mount.fuse.vhdsync"
	umountHelperName = "umount.fuse.vhdsync"
)

// ignoredMountOptions are the generic mount options that mean nothing to a
// FUSE disk (or that mount(8), mount.fuse or systemd have already acted
// on): accepted and dropped.
var ignoredMountOptions = map[string]bool{
	"rw": true, "defaults": true, "auto": true, "noauto": true, "user": true, "nouser": true,
	"users": true, "owner": true, "group": true, "_netdev": true, "nofail": true,
	"dev": true, "nodev": true, "suid": true, "nosuid": true, "exec": true, "noexec": true,
	"async": true, "atime": true, "noatime": true, "relatime": true, "strictatime": true,
	"diratime": true, "nodiratime": true, "lazytime": true, "nolazytime": true,
	"loud": true, "silent": true,
}

// refusedMountOptions are mount flags that have no place in an fstab line,
// with what to do instead.
var refusedMountOptions = map[string]string{
	"ro":          "a vhdsync disk is mounted read-write (attach its loop device with losetup --read-only for a read-only view)",
	"state":       "the state directory is the first field of the fstab line (the mount's source)",
	"foreground":  "mount(8) waits for the helper, which returns once the mount answers; run `vhdsync mount --foreground` from a service instead (dist/systemd/vhdsync@.service)",
	"sas":         "/etc/fstab and the command line are readable by every user: put the SAS in the file `sas` of a credentials directory and give -o credentials=DIR",
	"break-lease": "breaking another writer's lease is a one-off decision: run `vhdsync mount --break-lease` by hand",
}

// mountHelperArgs turns the mount(8) and umount(8) helper forms (see above)
// into a vhdsync command line; any other command line is returned as it
// is. done reports that the helper has nothing left to do: mount -f
// (fake), or a forced or lazy unmount it did itself. setenv receives the
// credentials directory of -o credentials=DIR.
func mountHelperArgs(argv0 string, args []string, setenv func(key, value string) error) (out []string, done bool, err error) {
	switch filepath.Base(argv0) {
	case mountHelperName:
		out, err = mountHelperCommand(args, setenv)
	case umountHelperName:
		out, err = umountHelperCommand(args)
	default:
		if len(args) < 2 || strings.HasPrefix(args[0], "-") || isCommandName(args[0]) {
			return args, false, nil
		}
		if st, serr := os.Stat(args[0]); serr != nil || !st.IsDir() {
			return args, false, nil
		}
		// mount.fuse's form: the state directory where a command goes.
		out, err = mountHelperCommand(args, setenv)
	}
	return out, out == nil && err == nil, err
}

// isCommandName reports whether name is one of vhdsync's commands.
func isCommandName(name string) bool {
	root := newRootCmd(&globals{stdout: io.Discard, stderr: io.Discard, env: os.Getenv})
	for _, c := range root.Commands() {
		if c.Name() == name || c.HasAlias(name) {
			return true
		}
	}
	return name == "help" || name == "completion"
}

// helperFlags splits a helper's arguments into its positional arguments
// and the values of -o, -t and -N, plus its single-letter flags.
type helperFlags struct {
	positional []string
	options    []string // each -o value
	fstype     string
	namespace  string
	letters    string // s f n v (mount), f l n r v (umount), c
}

func parseHelperFlags(args []string) (helperFlags, error) {
	var h helperFlags
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-o" || a == "-t" || a == "-N":
			if i+1 >= len(args) {
				return h, usageError{fmt.Errorf("%s needs a value", a)}
			}
			i++
			switch a {
			case "-o":
				h.options = append(h.options, args[i])
			case "-t":
				h.fstype = args[i]
			case "-N":
				h.namespace = args[i]
			}
		case strings.HasPrefix(a, "-o") && len(a) > 2:
			h.options = append(h.options, a[2:])
		case strings.HasPrefix(a, "-") && len(a) > 1 && !strings.HasPrefix(a, "--"):
			for _, c := range a[1:] {
				if !strings.ContainsRune("sfnvlrc", c) {
					return h, usageError{fmt.Errorf("unknown helper flag -%c", c)}
				}
			}
			h.letters += a[1:]
		default:
			h.positional = append(h.positional, a)
		}
	}
	if h.namespace != "" {
		return h, usageError{fmt.Errorf("-N %s: mounting in another mount namespace is not supported; run the mount inside it", h.namespace)}
	}
	if h.fstype != "" && h.fstype != "fuse.vhdsync" && h.fstype != "vhdsync" {
		return h, usageError{fmt.Errorf("-t %s: this helper mounts fuse.vhdsync only", h.fstype)}
	}
	return h, nil
}

// mountHelperCommand maps `STATEDIR MOUNTPOINT [flags] -o OPTS` to
// `mount --state STATEDIR [--flag value...] MOUNTPOINT`.
func mountHelperCommand(args []string, setenv func(key, value string) error) ([]string, error) {
	h, err := parseHelperFlags(args)
	if err != nil {
		return nil, err
	}
	if len(h.positional) != 2 {
		return nil, usageError{fmt.Errorf("mount helper: want STATEDIR MOUNTPOINT [-o OPTIONS], got %q", args)}
	}
	flags, creds, err := mountOptionFlags(strings.Join(h.options, ","), strings.ContainsRune(h.letters, 's'))
	if err != nil {
		return nil, err
	}
	if creds != "" {
		if st, err := os.Stat(creds); err != nil || !st.IsDir() {
			return nil, usageError{fmt.Errorf("-o credentials=%s: not a directory (it holds the files sas, storage-key, connection-string or staging)", creds)}
		}
		if err := setenv(credentialsDirEnv, creds); err != nil {
			return nil, err
		}
	}
	if strings.ContainsRune(h.letters, 'f') {
		return nil, nil // mount -f: everything checked, nothing to mount
	}
	out := append([]string{"mount", "--state", h.positional[0]}, flags...)
	return append(out, h.positional[1]), nil
}

// mountOptionFlags maps the comma-separated mount options to flags of
// `vhdsync mount`: an option named like a flag (`_` or `-` alike) sets it,
// `name=value` for a valued flag, a bare name for a switch
// (allow_other, log_json); generic options are dropped. credentials=DIR
// names the credentials directory. With sloppy (mount -s), an unknown
// option is dropped instead of refused.
func mountOptionFlags(opts string, sloppy bool) (flags []string, credentials string, err error) {
	root := newRootCmd(&globals{stdout: io.Discard, stderr: io.Discard, env: os.Getenv})
	mc, _, ferr := root.Find([]string{"mount"})
	if ferr != nil {
		return nil, "", ferr
	}
	for _, o := range strings.Split(opts, ",") {
		if o == "" || ignoredMountOptions[o] || strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "comment=") {
			continue
		}
		name, value, hasValue := strings.Cut(o, "=")
		name = strings.ReplaceAll(name, "_", "-")
		if name == "credentials" {
			if !hasValue || value == "" {
				return nil, "", usageError{errors.New("-o credentials: give the directory, credentials=DIR")}
			}
			credentials = value
			continue
		}
		if why, ok := refusedMountOptions[name]; ok {
			return nil, "", usageError{fmt.Errorf("mount option %q: %s", o, why)}
		}
		fl := mc.Flags().Lookup(name)
		if fl == nil {
			fl = root.PersistentFlags().Lookup(name)
		}
		if fl == nil {
			if sloppy {
				continue
			}
			return nil, "", usageError{fmt.Errorf("unknown mount option %q (the options are the flags of `vhdsync mount`, e.g. journal_cap=8GiB, recovery_points=15m, metrics=9464, allow_other; see README \"/etc/fstab\")", o)}
		}
		if name == "staging" && strings.Contains(value, "sig=") {
			return nil, "", usageError{errors.New("mount option staging: /etc/fstab is readable by every user: put the staging URL with its SAS in the file `staging` of a credentials directory (-o credentials=DIR)")}
		}
		isSwitch := fl.Value.Type() == "bool"
		switch {
		case isSwitch && !hasValue:
			flags = append(flags, "--"+name)
		case isSwitch:
			flags = append(flags, "--"+name+"="+value)
		case !hasValue:
			return nil, "", usageError{fmt.Errorf("mount option %q needs a value: %s=VALUE", o, o)}
		default:
			flags = append(flags, "--"+name, value)
		}
	}
	return flags, credentials, nil
}

// umountHelperCommand maps `MOUNTPOINT [-flnrv]` to `unmount MOUNTPOINT`,
// which waits until the blob holds every write. A forced or lazy unmount
// (-f, -l) is done here at once, without waiting: the daemon drains on
// its own and the journal keeps what it could not send.
func umountHelperCommand(args []string) ([]string, error) {
	h, err := parseHelperFlags(args)
	if err != nil {
		return nil, err
	}
	if len(h.positional) != 1 {
		return nil, usageError{fmt.Errorf("umount helper: want MOUNTPOINT, got %q", args)}
	}
	mp := h.positional[0]
	var flags int
	if strings.ContainsRune(h.letters, 'l') {
		flags |= syscall.MNT_DETACH
	}
	if strings.ContainsRune(h.letters, 'f') {
		flags |= syscall.MNT_FORCE
	}
	if flags != 0 {
		if err := syscall.Unmount(mp, flags); err != nil {
			return nil, fmt.Errorf("unmount %s: %w", mp, err)
		}
		return nil, nil
	}
	return []string{"unmount", mp}, nil
}
