package vhdlayer

import "fmt"

// Geometry is the cylinder/head/sector triple stored in a VHD footer.
type Geometry struct {
	Cylinders       uint16
	Heads           uint8
	SectorsPerTrack uint8
}

// Sectors returns C*H*S, the disk size the geometry describes in sectors.
func (g Geometry) Sectors() uint64 {
	return uint64(g.Cylinders) * uint64(g.Heads) * uint64(g.SectorsPerTrack)
}

// String formats the geometry as C/H/S.
func (g Geometry) String() string {
	return fmt.Sprintf("%d/%d/%d", g.Cylinders, g.Heads, g.SectorsPerTrack)
}

// MaxGeometrySectors is the largest disk CHS can describe:
// 65535 cylinders, 16 heads, 255 sectors per track (about 127 GiB).
const MaxGeometrySectors = 65535 * 16 * 255

// GeometryForSize computes the CHS geometry of a disk of size bytes with the
// algorithm in appendix "CHS Calculation" of the VHD specification. Sizes
// beyond what CHS can describe get the maximum geometry, as the
// specification says.
func GeometryForSize(size uint64) Geometry {
	totalSectors := size / SectorSize
	if totalSectors > MaxGeometrySectors {
		totalSectors = MaxGeometrySectors
	}
	var spt, heads, cylTimesHeads uint64
	if totalSectors >= 65535*16*63 {
		spt = 255
		heads = 16
		cylTimesHeads = totalSectors / spt
	} else {
		spt = 17
		cylTimesHeads = totalSectors / spt
		heads = (cylTimesHeads + 1023) / 1024
		if heads < 4 {
			heads = 4
		}
		if cylTimesHeads >= heads*1024 || heads > 16 {
			spt = 31
			heads = 16
			cylTimesHeads = totalSectors / spt
		}
		if cylTimesHeads >= heads*1024 {
			spt = 63
			heads = 16
			cylTimesHeads = totalSectors / spt
		}
	}
	return Geometry{
		Cylinders:       uint16(cylTimesHeads / heads),
		Heads:           uint8(heads),
		SectorsPerTrack: uint8(spt),
	}
}
