package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPluginLinksNoDatapath: the CNI plugin is exec'd by the runtime for
// every pod; it reads tulled's contracts (internal/api) and must not pull in
// the datapath, the lease stores or their dependencies.
func TestPluginLinksNoDatapath(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/tulle-net/tulle/tunnel", "github.com/tulle-net/tulle/lease", "github.com/tulle-net/tulle/encap", "golang.zx2c4.com/wireguard", "k8s.io/client-go"} {
			if dep == banned || strings.HasPrefix(dep, banned+"/") {
				t.Errorf("the CNI plugin links %s", dep)
			}
		}
	}
}
