package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

func newInspectCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect FILE|URL",
		Short: "Print a VHD's footer fields and whether Azure would accept it",
		Long: `Read the footer (the last 512 bytes) of a local file or of a page blob and
print its fields and the validation verdict: a fixed VHD whose size is a whole
number of MiB between 20 MiB and 8 TiB - 1 MiB and whose length is that size
plus 512 bytes.

Exit status: 0 valid; 6 not a valid fixed VHD (the problems are listed);
3 authentication failed; 4 blob or container missing; 1 other errors.`,
		Example: `  vhdsync inspect disk.vhd
  vhdsync inspect --json https://acct.blob.core.windows.net/disks/data.vhd`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := inspect(cmd, g, args[0])
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				rep.print(g.stdout)
			}
			if !rep.Valid {
				return fmt.Errorf("%w: %s", errInvalidVHD, strings.Join(rep.Problems, "; "))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}

type geometryJSON struct {
	Cylinders       uint16 `json:"cylinders"`
	Heads           uint8  `json:"heads"`
	SectorsPerTrack uint8  `json:"sectors_per_track"`
	Bytes           uint64 `json:"bytes"`
}

type footerJSON struct {
	Cookie           string       `json:"cookie"`
	Features         uint32       `json:"features"`
	FormatVersion    string       `json:"format_version"`
	DataOffset       string       `json:"data_offset"`
	Timestamp        uint32       `json:"timestamp"`
	Time             string       `json:"time"`
	CreatorApp       string       `json:"creator_app"`
	CreatorVersion   string       `json:"creator_version"`
	CreatorHost      string       `json:"creator_host"`
	OriginalSize     uint64       `json:"original_size"`
	CurrentSize      uint64       `json:"current_size"`
	Geometry         geometryJSON `json:"geometry"`
	DiskType         string       `json:"disk_type"`
	Checksum         string       `json:"checksum"`
	ChecksumExpected string       `json:"checksum_expected"`
	ChecksumValid    bool         `json:"checksum_valid"`
	UniqueID         string       `json:"unique_id"`
	SavedState       uint8        `json:"saved_state"`
}

type inspectReport struct {
	Source   string      `json:"source"`
	Kind     string      `json:"kind"`
	Length   int64       `json:"length"`
	BlobType string      `json:"blob_type,omitempty"`
	Footer   *footerJSON `json:"footer,omitempty"`
	Valid    bool        `json:"valid"`
	Problems []string    `json:"problems"`
}

func inspect(cmd *cobra.Command, g *globals, src string) (*inspectReport, error) {
	rep := &inspectReport{Source: src, Problems: []string{}}
	var raw [vhdlayer.FooterSize]byte
	if strings.HasPrefix(src, "http://") || strings.HasPrefix(src, "https://") {
		c, err := pageblob.Open(src, &pageblob.Options{Env: g.env})
		if err != nil {
			return nil, err
		}
		rep.Source, rep.Kind = c.Location().URL(), "blob"
		props, r, err := c.ReadFooter(cmd.Context())
		rep.Length, rep.BlobType = props.Length, props.BlobType
		if errors.Is(err, pageblob.ErrNotPageBlob) || errors.Is(err, pageblob.ErrNotFixedVHD) {
			rep.Problems = append(rep.Problems, err.Error())
			return rep, nil
		}
		if err != nil {
			return nil, err
		}
		raw = r
	} else {
		rep.Kind = "file"
		f, err := os.Open(src)
		if err != nil {
			return nil, fmt.Errorf("inspect: %w", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("inspect: %w", err)
		}
		rep.Length = st.Size()
		if st.Size() < vhdlayer.FooterSize {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%v: the file is %d bytes, too short for a 512-byte footer", vhdlayer.ErrNotVHD, st.Size()))
			return rep, nil
		}
		if _, err := f.ReadAt(raw[:], st.Size()-vhdlayer.FooterSize); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("inspect: read footer: %w", err)
		}
	}
	ft, _ := vhdlayer.DecodeFooterUnchecked(raw[:])
	if string(ft.Cookie[:]) != vhdlayer.Cookie {
		_, err := vhdlayer.DecodeFooter(raw[:])
		rep.Problems = append(rep.Problems, err.Error())
		return rep, nil
	}
	expected := vhdlayer.ComputeChecksum(raw[:])
	rep.Footer = footerFields(ft, expected)
	if _, err := vhdlayer.DecodeFooter(raw[:]); err != nil {
		rep.Problems = append(rep.Problems, err.Error())
	}
	length := rep.Length
	if ft.DiskType != vhdlayer.DiskTypeFixed {
		length = -1 // only a fixed disk's length follows from its footer
	}
	if err := vhdlayer.Validate(ft, length); err != nil {
		for _, e := range unjoin(err) {
			rep.Problems = append(rep.Problems, e.Error())
		}
	}
	rep.Valid = len(rep.Problems) == 0
	return rep, nil
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func footerFields(f vhdlayer.Footer, expected uint32) *footerJSON {
	return &footerJSON{
		Cookie:         string(f.Cookie[:]),
		Features:       f.Features,
		FormatVersion:  fmt.Sprintf("%d.%d", f.FormatVersion>>16, f.FormatVersion&0xffff),
		DataOffset:     fmt.Sprintf("0x%016x", f.DataOffset),
		Timestamp:      f.Timestamp,
		Time:           vhdlayer.TimeFromTimestamp(f.Timestamp).Format("2006-01-02T15:04:05Z"),
		CreatorApp:     f.CreatorAppString(),
		CreatorVersion: fmt.Sprintf("0x%08x", f.CreatorVersion),
		CreatorHost:    f.CreatorHostString(),
		OriginalSize:   f.OriginalSize,
		CurrentSize:    f.CurrentSize,
		Geometry: geometryJSON{Cylinders: f.Geometry.Cylinders, Heads: f.Geometry.Heads,
			SectorsPerTrack: f.Geometry.SectorsPerTrack, Bytes: f.Geometry.Sectors() * vhdlayer.SectorSize},
		DiskType:         f.DiskType.String(),
		Checksum:         fmt.Sprintf("0x%08x", f.Checksum),
		ChecksumExpected: fmt.Sprintf("0x%08x", expected),
		ChecksumValid:    f.Checksum == expected,
		UniqueID:         f.UniqueID.String(),
		SavedState:       f.SavedState,
	}
}

func (r *inspectReport) print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "source:\t%s (%s, %d bytes)\n", r.Source, r.Kind, r.Length)
	if r.BlobType != "" {
		fmt.Fprintf(tw, "blob type:\t%s\n", r.BlobType)
	}
	if f := r.Footer; f != nil {
		fmt.Fprintf(tw, "cookie:\t%s\n", f.Cookie)
		fmt.Fprintf(tw, "features:\t0x%08x\n", f.Features)
		fmt.Fprintf(tw, "format version:\t%s\n", f.FormatVersion)
		fmt.Fprintf(tw, "data offset:\t%s\n", f.DataOffset)
		fmt.Fprintf(tw, "timestamp:\t%s (%d s since 2000-01-01)\n", f.Time, f.Timestamp)
		fmt.Fprintf(tw, "creator:\t%q version %s on %q\n", f.CreatorApp, f.CreatorVersion, f.CreatorHost)
		fmt.Fprintf(tw, "original size:\t%d (%s)\n", f.OriginalSize, vhdlayer.FormatSize(f.OriginalSize))
		fmt.Fprintf(tw, "current size:\t%d (%s)\n", f.CurrentSize, vhdlayer.FormatSize(f.CurrentSize))
		fmt.Fprintf(tw, "geometry (C/H/S):\t%d/%d/%d (%d bytes)\n", f.Geometry.Cylinders, f.Geometry.Heads, f.Geometry.SectorsPerTrack, f.Geometry.Bytes)
		fmt.Fprintf(tw, "disk type:\t%s\n", f.DiskType)
		if f.ChecksumValid {
			fmt.Fprintf(tw, "checksum:\t%s (correct)\n", f.Checksum)
		} else {
			fmt.Fprintf(tw, "checksum:\t%s (WRONG: contents give %s)\n", f.Checksum, f.ChecksumExpected)
		}
		fmt.Fprintf(tw, "unique id:\t%s\n", f.UniqueID)
		fmt.Fprintf(tw, "saved state:\t%d\n", f.SavedState)
	}
	if r.Valid {
		fmt.Fprintf(tw, "verdict:\tvalid fixed VHD that Azure accepts as a managed disk's source\n")
	} else {
		fmt.Fprintf(tw, "verdict:\tNOT VALID\n")
		for _, p := range r.Problems {
			fmt.Fprintf(tw, "  problem:\t%s\n", p)
		}
	}
	tw.Flush()
}
