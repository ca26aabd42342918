package apiv1

// Version is the version of attested's binaries. It lives beside the API
// every binary links, so the lighter ones report it without linking the
// broker; the broker reports it in Info.
const Version = "0.1.0"
