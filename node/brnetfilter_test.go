package node

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestBridgeNetfilterCheck: ready while /proc/sys/net/bridge has the
// module's sysctls (whatever their values: the CNI plugin sets the
// bridge's own flags), not ready with the reason when it has none.
func TestBridgeNetfilterCheck(t *testing.T) {
	dir := t.TempDir()
	check := bridgeNetfilterCheck(dir)
	if err := check(); !errors.Is(err, errNoBridgeNetfilter) {
		t.Errorf("without br_netfilter: %v, want errNoBridgeNetfilter", err)
	}
	os.MkdirAll(filepath.Join(dir, "bridge"), 0o755)
	os.WriteFile(filepath.Join(dir, "bridge", "bridge-nf-call-iptables"), []byte("0\n"), 0o644)
	if err := check(); err != nil {
		t.Errorf("with br_netfilter (sysctl 0): %v, want ready", err)
	}
	if _, err := os.Stat("/proc/sys/net/bridge"); err == nil {
		if err := bridgeNetfilterCheck("/proc/sys/net")(); err != nil {
			t.Errorf("this machine has br_netfilter, the check says %v", err)
		}
	}
}
