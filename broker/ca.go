package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/attested-dev/attested/broker/keysig"
)

// The broker CA issues two certificates: the TLS server certificate and the
// wrapping-key signing certificate. It is name-constrained to the server's
// names and limited to those two usages, so even its key, if stolen, cannot
// vouch for another host or serve as a general-purpose CA; its private key
// is written outside the serving data directory (see Init).

// Lifetimes of what init issues.
const (
	caLifetime     = 10 * 365 * 24 * time.Hour
	serverLifetime = 2 * 365 * 24 * time.Hour
)

// serverNames are the DNS names and IPs the broker answers on.
type serverNames struct {
	DNS []string
	IPs []net.IP
}

// brokerNames collects the server certificate's names: loopback, the
// broker id when it is a DNS name, the listen host and the extra SANs.
func brokerNames(id, listen string, sans []string) (serverNames, error) {
	n := serverNames{DNS: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}}
	if validDNSName(id) {
		n.DNS = append(n.DNS, id)
	}
	if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
			sans = append([]string{host}, sans...)
		}
	}
	for _, s := range sans {
		if s == "" {
			continue
		}
		if ip := net.ParseIP(s); ip != nil {
			if ip.IsUnspecified() {
				return n, fmt.Errorf("broker: init: %q is not an address clients can reach; name the broker's real address with --san", s)
			}
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			if !containsIP(n.IPs, ip) {
				n.IPs = append(n.IPs, ip)
			}
			continue
		}
		name := strings.ToLower(strings.TrimSuffix(s, "."))
		if !validDNSName(strings.TrimPrefix(name, "*.")) {
			return n, fmt.Errorf("broker: init: %q is neither an IP address nor a DNS name", s)
		}
		if !slices.Contains(n.DNS, name) {
			n.DNS = append(n.DNS, name)
		}
	}
	return n, nil
}

// constraints are the CA's permitted DNS domains: each name (a wildcard
// permits its parent domain's subdomains).
func (n serverNames) constraints() (dns []string, ips []*net.IPNet) {
	for _, d := range n.DNS {
		d = strings.TrimPrefix(d, "*.")
		if !slices.Contains(dns, d) {
			dns = append(dns, d)
		}
	}
	for _, ip := range n.IPs {
		ips = append(ips, &net.IPNet{IP: ip, Mask: net.CIDRMask(len(ip)*8, len(ip)*8)})
	}
	return dns, ips
}

func (n serverNames) String() string {
	all := append([]string(nil), n.DNS...)
	for _, ip := range n.IPs {
		all = append(all, ip.String())
	}
	return strings.Join(all, ", ")
}

func containsIP(ips []net.IP, ip net.IP) bool {
	for _, x := range ips {
		if x.Equal(ip) {
			return true
		}
	}
	return false
}

// validDNSName reports whether s is a host name: dot-separated labels of
// letters, digits and inner hyphens, each 1-63 characters.
func validDNSName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

func serial() *big.Int { return new(big.Int).SetBytes(randomBytes(16)) }

// newCA creates the broker CA, constrained to names and to the usages it
// issues: TLS server authentication and wrapping-key signing.
func newCA(id string, names serverNames) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: CA key: %w", err)
	}
	dns, ips := names.constraints()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:                serial(),
		Subject:                     pkix.Name{CommonName: "attested broker CA " + id},
		NotBefore:                   now.Add(-time.Hour),
		NotAfter:                    now.Add(caLifetime),
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid:       true,
		IsCA:                        true,
		MaxPathLenZero:              true,
		PermittedDNSDomainsCritical: true,
		PermittedDNSDomains:         dns,
		PermittedIPRanges:           ips,
		ExtKeyUsage:                 []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		UnknownExtKeyUsage:          []asn1.ObjectIdentifier{keysig.ExtKeyUsage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

// newServerCert issues the TLS server certificate for names.
func newServerCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, id string, names serverNames) (certDER []byte, key *ecdsa.PrivateKey, err error) {
	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: server key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: id},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(serverLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     names.DNS,
		IPAddresses:  names.IPs,
	}
	certDER, err = x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: server certificate: %w", err)
	}
	return certDER, key, nil
}

// newSignerCert issues the wrapping-key signing certificate: ECDSA P-256,
// the broker id as subject (clients check it against the key's broker),
// only the wrapping-key signing usage, and no names, so it can serve
// nothing else. It lives as long as the CA.
func newSignerCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, id string) (certDER []byte, key *ecdsa.PrivateKey, err error) {
	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: signing key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:       serial(),
		Subject:            pkix.Name{CommonName: id},
		NotBefore:          now.Add(-time.Hour),
		NotAfter:           ca.NotAfter,
		KeyUsage:           x509.KeyUsageDigitalSignature,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{keysig.ExtKeyUsage},
	}
	certDER, err = x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: signing certificate: %w", err)
	}
	return certDER, key, nil
}
