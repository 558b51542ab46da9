#ifndef GETDCMTAGS_SIDECAR_H
#define GETDCMTAGS_SIDECAR_H

// The sidecar JSON of a DICOM file, as `mercli tags` prints it (rules: mercli/tags/__init__.py).
// Reading stops after (0028,0008) NumberOfFrames; damage before that makes a file unreadable.

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dctk.h"

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace getdcmtags {

// Not readable DICOM; what() is the reason printed after "Error: ".
class Unreadable : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// (keyword, serialized JSON value) of one file, in sidecar order.
using Fields = std::vector<std::pair<std::string, std::string>>;

// The sidecar fields of one file; throws Unreadable.
Fields sidecarFields(const char *path);

// One compact JSON object of `fields`.
std::string toJson(const Fields &fields);

// The sidecar line of one file; throws Unreadable.
std::string sidecar(const char *path);

}  // namespace getdcmtags

#endif  // GETDCMTAGS_SIDECAR_H
