package kubecluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Cluster DNS, as kubeadm installs it: CoreDNS behind the kube-dns
// Service at DNSAddress, the address every kubelet gives its pods.
const (
	DNSAddress    = "100.64.0.10"
	ClusterDomain = "cluster.local"
)

// dnsManifest is CoreDNS the way kubeadm deploys it, less what needs a
// network beyond the cluster (no forward plugin: names outside
// cluster.local get no answer).
const dnsManifest = `apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health {
            lameduck 5s
        }
        ready
        kubernetes %[1]s in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }
        cache 30
        loop
        reload
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  replicas: 2
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      tolerations:
        - {key: node-role.kubernetes.io/control-plane, effect: NoSchedule}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                labelSelector: {matchLabels: {k8s-app: kube-dns}}
                topologyKey: kubernetes.io/hostname
      volumes:
        - name: config
          configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
      containers:
        - name: coredns
          image: %[2]s
          imagePullPolicy: Never
          args: [-conf, /etc/coredns/Corefile]
          volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
          ports:
            - {name: dns, containerPort: 53, protocol: UDP}
            - {name: dns-tcp, containerPort: 53, protocol: TCP}
          livenessProbe:
            httpGet: {path: /health, port: 8080}
            initialDelaySeconds: 10
          readinessProbe:
            httpGet: {path: /ready, port: 8181}
          resources:
            requests: {cpu: 10m, memory: 32Mi}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: %[3]s
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
`

// DeployDNS installs CoreDNS (its image must be on the nodes: Options.E2E)
// and waits until both replicas are Ready.
func (c *Cluster) DeployDNS(ctx context.Context) error {
	p := filepath.Join(c.opt.Dir, "coredns.yaml")
	if err := os.WriteFile(p, fmt.Appendf(nil, dnsManifest, ClusterDomain, CoreDNSImage, DNSAddress), 0o644); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "apply", "-f", p); err != nil {
		return err
	}
	return c.waitSelected(ctx, "kube-system", "k8s-app=kube-dns", 2, 3*time.Minute)
}
