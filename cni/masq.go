package cni

import (
	"bytes"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"

	"github.com/tulle-net/tulle/internal/api"
)

var nftUnsafe = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// masqTable names the nftables table of a network.
func masqTable(network string) string {
	return "tulle_" + nftUnsafe.ReplaceAllString(network, "_")
}

// ensureMasq (re)writes, atomically, the network's nftables table: traffic
// from the node's pod subnets to anywhere outside the cluster networks is
// masqueraded to the node's address; traffic inside the cluster keeps pod
// addresses end to end.
func ensureMasq(network string, sub *api.SubnetFile) error {
	t := masqTable(network)
	var rules []string
	add := func(fam string, subnet, cluster netip.Prefix) {
		if subnet.IsValid() {
			rules = append(rules, fmt.Sprintf("\t\t%s saddr %s %s daddr != %s masquerade", fam, subnet.Masked(), fam, cluster.Masked()))
		}
	}
	add("ip", sub.Subnet, sub.Network)
	add("ip6", sub.IPv6Subnet, sub.IPv6Network)
	script := fmt.Sprintf("table inet %[1]s {}\nflush table inet %[1]s\ntable inet %[1]s {\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n%[2]s\n\t}\n}\n", t, strings.Join(rules, "\n"))
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
