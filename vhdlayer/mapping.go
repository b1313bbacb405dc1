package vhdlayer

// Layout maps the offsets of the ".vhd" view of a fixed disk (data followed
// by the footer) onto the data region and the footer.
type Layout struct {
	// VirtualSize is the size of the data region in bytes.
	VirtualSize int64
}

// VHDSize is the length of the whole fixed VHD: data plus footer.
func (l Layout) VHDSize() int64 { return l.VirtualSize + FooterSize }

// Split cuts the byte range [off, off+n) of the .vhd view into the part in
// the data region and the part in the footer. dataLen is how many bytes,
// from off, fall in the data region; footerOff and footerLen locate the rest
// inside the 512-byte footer. Ranges past the end are clipped.
func (l Layout) Split(off, n int64) (dataLen, footerOff, footerLen int64) {
	end := off + n
	if end > l.VHDSize() {
		end = l.VHDSize()
	}
	if off >= end {
		return 0, 0, 0
	}
	if off < l.VirtualSize {
		dataEnd := end
		if dataEnd > l.VirtualSize {
			dataEnd = l.VirtualSize
		}
		dataLen = dataEnd - off
	}
	if end > l.VirtualSize {
		start := off
		if start < l.VirtualSize {
			start = l.VirtualSize
		}
		footerOff = start - l.VirtualSize
		footerLen = end - start
	}
	return dataLen, footerOff, footerLen
}
