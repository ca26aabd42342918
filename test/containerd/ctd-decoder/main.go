// Command ctd-decoder is containerd's ocicrypt stream processor, built from
// the github.com/containerd/imgcrypt/v2 library for the end-to-end tests.
//
// Upstream's binary lives in imgcrypt's cmd/ module, which the Go module
// proxy does not serve; this program does what imgcrypt v2.0.3's
// cmd/ctd-decoder does, step for step, so containerd and attested see the
// same process they would on a node:
//
//   - containerd starts it once per encrypted layer, with the encrypted blob
//     on stdin, and wants the decrypted blob on stdout;
//   - the decryption payload (an imgcrypt.Payload in a protobuf Any: the
//     DecryptConfig of the CRI "node" key model and the layer descriptor) is
//     on file descriptor 3; without it (containerd 2.x's transfer-service
//     pulls) it fails as upstream does: "could not proto.Unmarshal() decrypt
//     data";
//   - --decryption-keys-path adds the private keys found in a directory, as
//     upstream does (the directory must exist and hold only keys);
//   - ocicrypt calls the keyproviders named in OCICRYPT_KEYPROVIDER_CONFIG
//     (which containerd sets from the stream processor's env);
//   - any failure goes to stderr with exit status 1; containerd reports that
//     text in the pull's error.
//
// Usage (as containerd runs it): ctd-decoder [--decryption-keys-path DIR] <blob 3<payload
package main

import (
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/imgcrypt/v2"
	"github.com/containerd/imgcrypt/v2/images/encryption"
	"github.com/containerd/typeurl/v2"
	encconfig "github.com/containers/ocicrypt/config"
	cryptutils "github.com/containers/ocicrypt/utils"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// payloadFD is where containerd passes the payload (cmd.ExtraFiles[0]).
const payloadFD = 3

func main() {
	keysPath := flag.String("decryption-keys-path", "", "directory to load decryption keys from (optional)")
	flag.Parse()
	if err := decrypt(*keysPath, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func decrypt(keysPath string, in io.Reader, out io.Writer) error {
	payload, err := getPayload()
	if err != nil {
		return err
	}
	dc := &payload.DecryptConfig
	if keysPath != "" {
		cc, err := decryptionKeys(keysPath)
		if err != nil {
			return fmt.Errorf("unable to get decryption keys in provided key path: %w", err)
		}
		dc = encconfig.CombineCryptoConfigs([]encconfig.CryptoConfig{
			{DecryptConfig: cc.DecryptConfig}, {DecryptConfig: &payload.DecryptConfig},
		}).DecryptConfig
	}
	_, r, _, err := encryption.DecryptLayer(dc, in, payload.Descriptor, false)
	if err != nil {
		return fmt.Errorf("call to DecryptLayer failed: %w", err)
	}
	if _, err := io.Copy(out, r); err != nil {
		return fmt.Errorf("could not copy data: %w", err)
	}
	return nil
}

func getPayload() (*imgcrypt.Payload, error) {
	f := os.NewFile(payloadFD, "configFd")
	defer f.Close()
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("read payload: %w", err)
	}
	var anything anypb.Any
	if err := proto.Unmarshal(data, &anything); err != nil {
		return nil, fmt.Errorf("could not proto.Unmarshal() decrypt data: %w", err)
	}
	v, err := typeurl.UnmarshalAny(&anything)
	if err != nil {
		return nil, fmt.Errorf("could not UnmarshalAny() the decrypt data: %w", err)
	}
	p, ok := v.(*imgcrypt.Payload)
	if !ok {
		return nil, fmt.Errorf("unknown payload type %s", anything.TypeUrl)
	}
	return p, nil
}

// decryptionKeys reads every file under dir as a private key, as upstream's
// getDecryptionKeys does: a file that is not a key fails the layer.
func decryptionKeys(dir string) (encconfig.CryptoConfig, error) {
	var keys []string
	err := filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		if info.Mode()&os.ModeSymlink != 0 {
			return errors.New("symbolic links not supported in decryption keys paths")
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		keys = append(keys, base64.StdEncoding.EncodeToString(b))
		return nil
	})
	if err != nil {
		return encconfig.CryptoConfig{}, err
	}
	dc, err := cryptutils.SortDecryptionKeys(strings.Join(keys, ","))
	if err != nil {
		return encconfig.CryptoConfig{}, err
	}
	return encconfig.InitDecryption(dc), nil
}
