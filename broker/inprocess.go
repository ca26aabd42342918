package broker

import apiv1 "github.com/attested-dev/attested/broker/api/v1"

// AdminServer is the Admin service for in-process callers that have
// already authenticated the admin (the gRPC path checks the credential in
// its interceptor).
func (s *Server) AdminServer() apiv1.AdminServer { return adminServer{s: s} }
