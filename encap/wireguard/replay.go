package wireguard

// Replay window (RFC 6479's ring of bit blocks): counters more than
// windowSize behind the highest seen are rejected, each counter within it
// is accepted once.
const (
	blockBits  = 64
	ringBlocks = 128
	windowSize = (ringBlocks - 1) * blockBits
)

// replayFilter tracks a session's received counters. Not safe for
// concurrent use: the session's mutex guards it.
type replayFilter struct {
	last uint64
	ring [ringBlocks]uint64
}

// accept reports whether counter is new and, if so, records it. Call it
// only after the message authenticated.
func (f *replayFilter) accept(counter uint64) bool {
	if counter >= rejectAfterMessages {
		return false
	}
	block := counter / blockBits
	if counter > f.last {
		cur := f.last / blockBits
		diff := min(block-cur, ringBlocks)
		for i := uint64(1); i <= diff; i++ {
			f.ring[(cur+i)%ringBlocks] = 0
		}
		f.last = counter
	} else if f.last-counter > windowSize {
		return false
	}
	i, bit := block%ringBlocks, uint64(1)<<(counter%blockBits)
	if f.ring[i]&bit != 0 {
		return false
	}
	f.ring[i] |= bit
	return true
}
