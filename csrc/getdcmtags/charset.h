#ifndef GETDCMTAGS_CHARSET_H
#define GETDCMTAGS_CHARSET_H

#include "dcmtk/config/osconfig.h"
#include "dcmtk/ofstd/ofchrenc.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace getdcmtags {

// Decodes LO LT PN SH ST UC UT values to UTF-8 the way pydicom's decode_bytes does, with
// DCMTK's OFCharacterEncoding (iconv) for each codec. DcmSpecificCharacterSet is not used:
// on Debian's DCMTK (glibc iconv) it cannot select ISO 2022 IR 13 (no JIS_X0201 in glibc),
// rejects 'ISO_IR 6' as first of several values, and decodes a few cases differently from
// pydicom (escape sequences of a character set not declared, invalid bytes).
class TextDecoder {
  public:
    explicit TextDecoder(const std::string *rawCharset);

    std::string decode(const std::string &value);

  private:
    std::string decodeEscaped(const std::string &fragment);

    std::string decodeOrReplace(const std::string &codec, const std::string &bytes);

    // Python's errors="replace": U+FFFD for each byte no character starts at.
    std::string replacing(const std::string &codec, const std::string &bytes);

    std::string convert(const std::string &codec, const std::string &bytes, bool &ok);

    OFCharacterEncoding *encoder_for(const std::string &codec);

    std::vector<std::string> codecs_;  // Python codec names, as pydicom's convert_encodings
    std::vector<std::pair<std::string, std::unique_ptr<OFCharacterEncoding>>> encoders_;
};

}  // namespace getdcmtags

#endif  // GETDCMTAGS_CHARSET_H
