package policy

import (
	"net/netip"
	"slices"
)

// span is an inclusive address range of one family.
type span struct{ lo, hi netip.Addr }

func (s span) String() string {
	if s.lo == s.hi {
		return s.lo.String()
	}
	if p, ok := s.prefix(); ok {
		return p.String()
	}
	return s.lo.String() + "-" + s.hi.String()
}

// prefix returns s as a CIDR when it is exactly one.
func (s span) prefix() (netip.Prefix, bool) {
	for bits := 0; bits <= s.lo.BitLen(); bits++ {
		p := netip.PrefixFrom(s.lo, bits).Masked()
		if p.Addr() == s.lo && lastAddr(p) == s.hi {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// prefixSpan is p (masked: the API accepts host bits, as in
// "100.64.0.1/0") as a span.
func prefixSpan(p netip.Prefix) span {
	p = p.Masked()
	return span{p.Addr(), lastAddr(p)}
}

// subtract returns s without every span of cut.
func subtract(s []span, cut []span) []span {
	out := s
	for _, c := range cut {
		var next []span
		for _, x := range out {
			if c.hi.Less(x.lo) || x.hi.Less(c.lo) || c.lo.BitLen() != x.lo.BitLen() {
				next = append(next, x)
				continue
			}
			if x.lo.Less(c.lo) {
				next = append(next, span{x.lo, c.lo.Prev()})
			}
			if c.hi.Less(x.hi) {
				next = append(next, span{c.hi.Next(), x.hi})
			}
		}
		out = next
	}
	return out
}

// merge sorts spans of one family and joins overlapping and adjacent
// ones: an nftables interval set takes no overlaps.
func merge(s []span) []span {
	if len(s) == 0 {
		return nil
	}
	s = slices.Clone(s)
	slices.SortFunc(s, func(a, b span) int { return a.lo.Compare(b.lo) })
	out := []span{s[0]}
	for _, x := range s[1:] {
		last := &out[len(out)-1]
		next := last.hi.Next()
		if !next.IsValid() || !next.Less(x.lo) {
			if last.hi.Less(x.hi) {
				last.hi = x.hi
			}
			continue
		}
		out = append(out, x)
	}
	return out
}
