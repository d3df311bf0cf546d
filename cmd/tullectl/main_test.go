package main

import (
	"testing"
	"time"
)

// TestExpiry: a lease's expiry as tullectl status says it.
func TestExpiry(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		exp  time.Time
		want string
	}{
		{"lease mode", now.Add(90 * time.Second), "expires in 1m30s"},
		{"expired", now.Add(-5 * time.Second), "expired 5s ago"},
		{"podcidr mode", time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), "no expiry (held while the Node has these pod CIDRs)"},
		{"none", time.Time{}, "no expiry (held while the Node has these pod CIDRs)"},
	}
	for _, tc := range tests {
		if got := expiry(now, tc.exp); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
