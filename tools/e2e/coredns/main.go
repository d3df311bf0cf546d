// Command coredns is CoreDNS with only the plugins the conformance
// cluster's DNS uses: cluster records from the Kubernetes API and what
// serves, checks and caches them. Nothing here forwards to an upstream
// resolver (the cluster reaches no network outside its namespaces), so
// the plugins that need one are left out, and so is everything else a
// full build links.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// The plugins in CoreDNS's own order (plugin.cfg): a Corefile's
// directives run in this order whatever order it lists them in.
func init() {
	dnsserver.Directives = []string{
		"reload", "ready", "health", "errors", "log", "cache", "hosts", "kubernetes", "loop",
	}
}

func main() { coremain.Run() }
