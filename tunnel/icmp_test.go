package tunnel

import (
	"testing"
	"time"
)

func TestTokenBucket(t *testing.T) {
	start := time.Unix(1000, 0)
	b := tokenBucket{rate: 10, burst: 10, tokens: 10, last: start}
	allowed := 0
	for range 50 { // a burst of 50 at one instant: only the burst passes
		if b.allow(start) {
			allowed++
		}
	}
	if allowed != 10 {
		t.Errorf("burst: %d allowed, want 10", allowed)
	}
	// One second later, 10 more tokens (not 50).
	allowed = 0
	for range 50 {
		if b.allow(start.Add(time.Second)) {
			allowed++
		}
	}
	if allowed != 10 {
		t.Errorf("after 1s: %d allowed, want 10", allowed)
	}
	if b.allow(start.Add(time.Second + 50*time.Millisecond)) {
		t.Error("allowed after 50ms with an empty bucket at 10/s")
	}
	if !b.allow(start.Add(time.Second + 150*time.Millisecond)) {
		t.Error("not allowed after 150ms at 10/s")
	}
}
