package node

import (
	"log/slog"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/kube"
	"github.com/tulle-net/tulle/lease/local"
)

// store is what a node needs of a lease store.
type store interface {
	lease.Store
	lease.Lookuper
}

// openStore opens the configured lease store, and returns the Kubernetes
// client of the kube store (nil with the local store).
func openStore(c Config, log *slog.Logger) (kubernetes.Interface, store, error) {
	if c.LeaseStore == "local" {
		s, err := local.New(local.Options{Dir: c.LeaseDir, Net: c.Net, TTL: c.LeaseTTL, Logger: log})
		return nil, s, err
	}
	client, err := kubeClient(c)
	if err != nil {
		return nil, nil, err
	}
	s, err := kube.New(kube.Options{Client: client, Net: c.Net, Mode: kube.Mode(c.KubeMode), Namespace: c.KubeNamespace, TTL: c.LeaseTTL, Logger: log})
	return client, s, err
}

// kubeClient is the client of --kubeconfig, or of the pod's in-cluster
// config.
func kubeClient(c Config) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if c.Kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, netconf.Errorf("kubernetes client config (--kubeconfig, or in-cluster): %v", err)
	}
	cfg.UserAgent = "tulled"
	// Protobuf: Nodes and Pods are a fraction of their JSON size to
	// transfer and decode.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, netconf.Errorf("kubernetes client: %v", err)
	}
	return client, nil
}
