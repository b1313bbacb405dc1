// Package vhdlayer implements the parts of the Microsoft VHD format that
// vhdsync needs: the 512-byte footer of a fixed disk (encode, decode,
// checksum, CHS geometry, validation against Azure's page-blob rules), user
// size parsing, the mapping of the virtual ".vhd" file onto the data region
// and the footer, and a reader for dynamic disks used by import.
//
// The format follows the "Virtual Hard Disk Image Format Specification"
// (Microsoft, version 1.0). All multi-byte fields are big-endian.
package vhdlayer
