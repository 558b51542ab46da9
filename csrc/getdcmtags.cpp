// getdcmtags: print the sidecar JSON of DICOM files (SPEC §3), one compact object per line.
//
// The C++ twin of `mercli tags FILE...`: for the same file both print equal JSON. The rules
// (which keywords, in which order, how each VR becomes JSON) are written down once, in the
// module docstring of mercli/tags.py; this file follows them:
//
// - Keys are DICOM keywords in kSidecar order; TransferSyntaxUID comes from the file meta.
// - Text VRs are UTF-8 strings. LO LT PN SH ST UC UT are converted from (0008,0005) Specific
//   Character Set as pydicom's decode_bytes does (escape sequences, misspelled terms, bad
//   bytes replaced by U+FFFD), each codec through DCMTK's OFCharacterEncoding (iconv); the
//   other text VRs, and text in the default repertoire, are read as ISO 8859-1 like pydicom.
//   Trimming: trailing spaces and NULs of the whole value (AS CS DA DT TM UI PN), of each value
//   (LO SH UC), of the single value (LT ST UT); AE strips leading and trailing whitespace, UR
//   trailing whitespace.
// - IS US UL SS SL SV UV are JSON integers, DS FL FD JSON floats (FL as the shortest decimal
//   that reads back to the same 32-bit float). A value that does not parse, or is NaN or
//   infinite, stays a string. Several values make a list; missing and empty elements are left
//   out; SQ and binary VRs are skipped.
//
// Reading stops at the first top-level tag above (0028,0008) NumberOfFrames, so pixel data is
// never read. An unreadable file prints `Error: <reason> (<path>)` on stderr; the other files
// are still printed, and the exit code is then 1.
//
// Usage: getdcmtags FILE...

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dctk.h"
#include "dcmtk/ofstd/ofchrenc.h"
#include "dcmtk/oflog/oflog.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <memory>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Field {
    const char *keyword;
    Uint16 group;
    Uint16 element;
};

// Same keywords, same order as SIDECAR_KEYWORDS in mercli/tags.py.
const Field kSidecar[] = {
    {"SOPClassUID", 0x0008, 0x0016},
    {"SOPInstanceUID", 0x0008, 0x0018},
    {"SeriesInstanceUID", 0x0020, 0x000E},
    {"StudyInstanceUID", 0x0020, 0x000D},
    {"TransferSyntaxUID", 0x0002, 0x0010},
    {"Modality", 0x0008, 0x0060},
    {"PatientID", 0x0010, 0x0020},
    {"PatientName", 0x0010, 0x0010},
    {"PatientBirthDate", 0x0010, 0x0030},
    {"PatientSex", 0x0010, 0x0040},
    {"AccessionNumber", 0x0008, 0x0050},
    {"StudyID", 0x0020, 0x0010},
    {"StudyDate", 0x0008, 0x0020},
    {"StudyTime", 0x0008, 0x0030},
    {"StudyDescription", 0x0008, 0x1030},
    {"SeriesDescription", 0x0008, 0x103E},
    {"SeriesNumber", 0x0020, 0x0011},
    {"SeriesDate", 0x0008, 0x0021},
    {"SeriesTime", 0x0008, 0x0031},
    {"InstanceNumber", 0x0020, 0x0013},
    {"AcquisitionNumber", 0x0020, 0x0012},
    {"BodyPartExamined", 0x0018, 0x0015},
    {"ProtocolName", 0x0018, 0x1030},
    {"Manufacturer", 0x0008, 0x0070},
    {"ManufacturerModelName", 0x0008, 0x1090},
    {"StationName", 0x0008, 0x1010},
    {"DeviceSerialNumber", 0x0018, 0x1000},
    {"SoftwareVersions", 0x0018, 0x1020},
    {"InstitutionName", 0x0008, 0x0080},
    {"ReferringPhysicianName", 0x0008, 0x0090},
    {"ImageType", 0x0008, 0x0008},
    {"SliceThickness", 0x0018, 0x0050},
    {"MagneticFieldStrength", 0x0018, 0x0087},
    {"SequenceName", 0x0018, 0x0024},
    {"ScanningSequence", 0x0018, 0x0020},
    {"SequenceVariant", 0x0018, 0x0021},
    {"ContrastBolusAgent", 0x0018, 0x0010},
    {"ImageComments", 0x0020, 0x4000},
    {"NumberOfFrames", 0x0028, 0x0008},
};

// Reading stops at the first top-level tag at or above this one: after NumberOfFrames.
const DcmTagKey kStopAt(0x0028, 0x0009);

class Unreadable : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// --- JSON values -------------------------------------------------------------------------------

// A JSON value already serialized; `empty` marks an empty text item (JSON "").
struct Json {
    std::string text;
    bool empty = false;
};

std::string jsonString(const std::string &s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    return out + "\"";
}

Json textValue(const std::string &s) { return Json{jsonString(s), s.empty()}; }

// `x` as Python's repr(float) writes it: the shortest digits that read back to `x`, in fixed
// notation with at least one decimal (5.0) when 1e-4 <= |x| < 1e16, else as 1.5e-05.
std::string jsonFloat(double x) {
    char buf[40];
    for (int precision = 0; precision <= 16; ++precision) {
        std::snprintf(buf, sizeof buf, "%.*e", precision, x);
        if (std::strtod(buf, nullptr) == x) break;
    }
    std::string text = buf;  // [-]d[.ddd]e[+-]XX
    size_t e = text.find('e');
    int exponent = std::atoi(text.c_str() + e + 1);
    bool negative = text[0] == '-';
    std::string digits;
    for (size_t i = negative ? 1 : 0; i < e; ++i)
        if (text[i] != '.') digits += text[i];
    std::string out = negative ? "-" : "";
    if (exponent < -4 || exponent >= 16) {
        out += digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char exp[16];
        std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        return out + exp;
    }
    if (exponent < 0) return out + "0." + std::string(-exponent - 1, '0') + digits;
    if (digits.size() <= static_cast<size_t>(exponent) + 1)
        return out + digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
    return out + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

// FL: the shortest decimal (1 to 9 digits) whose nearest 32-bit float is `f` itself.
double shortestFloat32(float f) {
    char buf[40];
    for (int digits = 1; digits <= 9; ++digits) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(f));
        double candidate = std::strtod(buf, nullptr);
        if (std::fabs(candidate) > 3.4028234663852886e38) continue;  // past the float32 range
        float back = static_cast<float>(candidate);
        if (std::memcmp(&back, &f, sizeof f) == 0) return candidate;
    }
    return static_cast<double>(f);
}

Json binaryFloat(double x, bool isFL) {
    if (std::isnan(x)) return textValue("nan");
    if (std::isinf(x)) return textValue(x > 0 ? "inf" : "-inf");
    return Json{jsonFloat(isFL ? shortestFloat32(static_cast<float>(x)) : x)};
}

// --- text to numbers, as Python's int() and float() read it ------------------------------------

bool isPySpace(unsigned char c) {
    return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
           c == 0xA0;
}

std::string pyStrip(const std::string &s) {
    size_t b = 0, e = s.size();
    while (b < e && isPySpace(static_cast<unsigned char>(s[b]))) ++b;
    while (e > b && isPySpace(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
}

std::string rstripChars(const std::string &s, const char *chars, size_t n) {
    size_t e = s.size();
    while (e > 0 && std::memchr(chars, s[e - 1], n) != nullptr) --e;
    return s.substr(0, e);
}

std::string rstripSpaceNul(const std::string &s) { return rstripChars(s, " \0", 2); }

// Digits with single underscores between them (Python literal rules); appends the digits.
bool scanDigits(const std::string &s, size_t &i, std::string &digits) {
    size_t start = i;
    while (i < s.size()) {
        if (std::isdigit(static_cast<unsigned char>(s[i]))) {
            digits += s[i++];
        } else if (s[i] == '_' && i > start && i + 1 < s.size() &&
                   std::isdigit(static_cast<unsigned char>(s[i + 1])) &&
                   std::isdigit(static_cast<unsigned char>(s[i - 1]))) {
            ++i;
        } else {
            break;
        }
    }
    return i > start;
}

// Python int(text): optional sign and decimal digits; the canonical digits on success.
bool pyInt(const std::string &text, std::string &out) {
    std::string s = pyStrip(text);
    size_t i = 0;
    bool negative = false;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) negative = s[i++] == '-';
    std::string digits;
    if (!scanDigits(s, i, digits) || i != s.size()) return false;
    size_t nz = digits.find_first_not_of('0');
    digits = nz == std::string::npos ? "0" : digits.substr(nz);
    out = (negative && digits != "0" ? "-" : "") + digits;
    return true;
}

bool equalsNoCase(const std::string &a, const char *b) {
    if (a.size() != std::strlen(b)) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(a[i])) != b[i]) return false;
    return true;
}

// Python float(text): decimal floats, inf/infinity/nan; no hex (which strtod would accept).
bool pyFloat(const std::string &text, double &out) {
    std::string s = pyStrip(text);
    size_t i = 0;
    std::string clean;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
    std::string rest = s.substr(i);
    if (equalsNoCase(rest, "inf") || equalsNoCase(rest, "infinity") || equalsNoCase(rest, "nan")) {
        out = std::strtod((clean + rest).c_str(), nullptr);
        return true;
    }
    bool whole = scanDigits(s, i, clean);
    bool fraction = false;
    if (i < s.size() && s[i] == '.') {
        clean += s[i++];
        fraction = scanDigits(s, i, clean);
    }
    if (!whole && !fraction) return false;
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        clean += s[i++];
        if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
        if (!scanDigits(s, i, clean)) return false;
    }
    if (i != s.size()) return false;
    out = std::strtod(clean.c_str(), nullptr);
    return true;
}

// IS: an integer, or a float that is one ("1.0"); otherwise the text itself.
Json intFromText(const std::string &text) {
    std::string digits;
    if (pyInt(text, digits)) return Json{digits};
    double number;
    if (!pyFloat(text, number) || !std::isfinite(number) || number != std::floor(number))
        return textValue(text);
    char buf[400];
    std::snprintf(buf, sizeof buf, "%.0f", number);
    return Json{std::string(buf) == "-0" ? "0" : buf};
}

// DS: a float; NaN, infinite or unparseable stays the text.
Json floatFromText(const std::string &text) {
    double number;
    if (!pyFloat(text, number) || !std::isfinite(number)) return textValue(text);
    return Json{jsonFloat(number)};
}

// --- character sets ----------------------------------------------------------------------------

std::string latin1ToUtf8(const std::string &s) {
    std::string out;
    out.reserve(s.size());
    for (unsigned char c : s) {
        if (c < 0x80) {
            out += static_cast<char>(c);
        } else {
            out += static_cast<char>(0xC0 | (c >> 6));
            out += static_cast<char>(0x80 | (c & 0x3F));
        }
    }
    return out;
}

std::vector<std::string> split(const std::string &s, char delimiter) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (;;) {
        size_t pos = s.find(delimiter, start);
        parts.push_back(s.substr(start, pos == std::string::npos ? pos : pos - start));
        if (pos == std::string::npos) return parts;
        start = pos + 1;
    }
}

// Defined terms of (0008,0005) and the Python codec pydicom decodes each with
// (pydicom.charset.python_encoding); mirrored so that both tools decode alike.
const std::pair<const char *, const char *> kTerms[] = {
    {"", "iso8859"}, {"ISO_IR 6", "iso8859"}, {"ISO_IR 13", "shift_jis"},
    {"ISO_IR 100", "latin_1"}, {"ISO_IR 101", "iso8859_2"}, {"ISO_IR 109", "iso8859_3"},
    {"ISO_IR 110", "iso8859_4"}, {"ISO_IR 126", "iso_ir_126"}, {"ISO_IR 127", "iso_ir_127"},
    {"ISO_IR 138", "iso_ir_138"}, {"ISO_IR 144", "iso_ir_144"}, {"ISO_IR 148", "iso_ir_148"},
    {"ISO_IR 166", "iso_ir_166"}, {"ISO 2022 IR 6", "iso8859"}, {"ISO 2022 IR 13", "shift_jis"},
    {"ISO 2022 IR 87", "iso2022_jp"}, {"ISO 2022 IR 100", "latin_1"},
    {"ISO 2022 IR 101", "iso8859_2"}, {"ISO 2022 IR 109", "iso8859_3"},
    {"ISO 2022 IR 110", "iso8859_4"}, {"ISO 2022 IR 126", "iso_ir_126"},
    {"ISO 2022 IR 127", "iso_ir_127"}, {"ISO 2022 IR 138", "iso_ir_138"},
    {"ISO 2022 IR 144", "iso_ir_144"}, {"ISO 2022 IR 148", "iso_ir_148"},
    {"ISO 2022 IR 149", "euc_kr"}, {"ISO 2022 IR 159", "iso2022_jp_2"},
    {"ISO 2022 IR 166", "iso_ir_166"}, {"ISO 2022 IR 58", "iso_ir_58"}, {"ISO_IR 192", "UTF8"},
    {"GB18030", "GB18030"}, {"ISO 2022 GBK", "GBK"}, {"ISO 2022 58", "GB2312"}, {"GBK", "GBK"},
};

// Escape sequences (PS3.5 §6.1.2.5) and the codec of the text after them (pydicom's
// CODES_TO_ENCODINGS).
const std::pair<const char *, const char *> kEscapes[] = {
    {"\x1b(B", "iso8859"}, {"\x1b-A", "latin_1"}, {"\x1b)I", "shift_jis"},
    {"\x1b(J", "shift_jis"}, {"\x1b$B", "iso2022_jp"}, {"\x1b-B", "iso8859_2"},
    {"\x1b-C", "iso8859_3"}, {"\x1b-D", "iso8859_4"}, {"\x1b-F", "iso_ir_126"},
    {"\x1b-G", "iso_ir_127"}, {"\x1b-H", "iso_ir_138"}, {"\x1b-L", "iso_ir_144"},
    {"\x1b-M", "iso_ir_148"}, {"\x1b-T", "iso_ir_166"}, {"\x1b$)C", "euc_kr"},
    {"\x1b$(D", "iso2022_jp_2"}, {"\x1b$)A", "iso_ir_58"},
};

// The iconv name for each Python codec. Python's shift_jis keeps 0x5C and 0x7E as ASCII
// (glibc's SHIFT_JIS makes them YEN SIGN and OVERLINE), as CP932 does.
const std::pair<const char *, const char *> kIconvNames[] = {
    {"shift_jis", "CP932"}, {"iso8859_2", "ISO-8859-2"}, {"iso8859_3", "ISO-8859-3"},
    {"iso8859_4", "ISO-8859-4"}, {"iso_ir_126", "ISO-8859-7"}, {"iso_ir_127", "ISO-8859-6"},
    {"iso_ir_138", "ISO-8859-8"}, {"iso_ir_144", "ISO-8859-5"}, {"iso_ir_148", "ISO-8859-9"},
    {"iso_ir_166", "TIS-620"}, {"iso2022_jp", "ISO-2022-JP"}, {"iso2022_jp_2", "ISO-2022-JP-2"},
    {"euc_kr", "EUC-KR"}, {"iso_ir_58", "GB2312"}, {"UTF8", "UTF-8"}, {"GB18030", "GB18030"},
    {"GBK", "GBK"}, {"GB2312", "GB2312"},
};

// Codecs that read their own escape sequences; for the others pydicom strips them.
const char *const kEscapeAware[] = {"iso2022_jp", "iso2022_jp_2", "iso_ir_58"};
const char *const kStandAlone[] = {"ISO_IR 192", "GBK", "GB18030"};

template <size_t N>
const char *lookup(const std::pair<const char *, const char *> (&table)[N],
                   const std::string &key) {
    for (const auto &entry : table)
        if (key == entry.first) return entry.second;
    return nullptr;
}

template <size_t N>
bool inList(const std::string &term, const char *const (&list)[N]) {
    for (const char *item : list)
        if (term == item) return true;
    return false;
}

bool startsWith(const std::string &s, const char *prefix) {
    return s.compare(0, std::strlen(prefix), prefix) == 0;
}

// The codec for a defined term as pydicom picks it: common misspellings ("ISO IR 100",
// "ISO-2022-IR 87") corrected, anything else unknown read as the default (ISO 8859-1).
std::string codecForTerm(const std::string &term) {
    if (const char *codec = lookup(kTerms, term)) return codec;
    std::string patched;
    if (term.size() >= 6 && startsWith(term, "ISO") && term[3] != '_' &&
        term.compare(4, 2, "IR") == 0) {
        patched = "ISO_IR" + term.substr(6);
    } else if (term.size() >= 12 && startsWith(term, "ISO") && term.compare(4, 4, "2022") == 0 &&
               term.compare(9, 2, "IR") == 0 && !startsWith(term, "ISO 2022 IR ")) {
        patched = "ISO 2022 IR " + term.substr(12);
    }
    if (const char *codec = patched.empty() ? nullptr : lookup(kTerms, patched)) return codec;
    return "iso8859";
}

bool isLatin1(const std::string &codec) { return codec == "iso8859" || codec == "latin_1"; }

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Decodes LO LT PN SH ST UC UT values to UTF-8 the way pydicom's decode_bytes does, with
// DCMTK's OFCharacterEncoding (iconv) for each codec. DcmSpecificCharacterSet is not used:
// on Debian's DCMTK (glibc iconv) it cannot select ISO 2022 IR 13 (no JIS_X0201 in glibc),
// rejects 'ISO_IR 6' as first of several values, and decodes a few cases differently from
// pydicom (escape sequences of a character set not declared, invalid bytes).
class TextDecoder {
  public:
    explicit TextDecoder(const std::string *rawCharset) {
        if (rawCharset == nullptr) {
            codecs_.push_back("iso8859");
            return;
        }
        std::vector<std::string> terms = split(rstripSpaceNul(*rawCharset), '\\');
        if (terms.size() > 1 && terms[0].empty()) terms[0] = "ISO_IR 6";
        for (size_t i = 0; i < terms.size(); ++i) {
            if (i == 0 || !inList(terms[i], kStandAlone)) codecs_.push_back(codecForTerm(terms[i]));
            if (i == 0 && inList(terms[0], kStandAlone)) break;  // allows no code extensions
        }
    }

    std::string decode(const std::string &value) {
        if (value.find('\x1b') == std::string::npos) return decodeOrReplace(codecs_[0], value);
        std::string out;
        size_t start = 0;
        while (start < value.size()) {
            size_t next = value.find('\x1b', start + 1);
            if (next == std::string::npos) next = value.size();
            std::string fragment = value.substr(start, next - start);
            out += fragment[0] == '\x1b' ? decodeEscaped(fragment)
                                         : decodeOrReplace(codecs_[0], fragment);
            start = next;
        }
        return out;
    }

  private:
    std::string decodeEscaped(const std::string &fragment) {
        size_t length = startsWith(fragment, "\x1b$(") || startsWith(fragment, "\x1b$)") ? 4 : 3;
        const char *found = lookup(kEscapes, fragment.substr(0, length));
        std::string codec = found ? found : "";
        bool declared = false;
        for (const std::string &c : codecs_) declared = declared || c == codec;
        if (!declared && codec != "iso8859") return replacing(codecs_[0], fragment);
        if (inList(codec, kEscapeAware)) return decodeOrReplace(codec, fragment);
        std::string rest = fragment.substr(length);
        size_t delimiter = rest.find_first_of("\r\n\t\f");
        if (delimiter == std::string::npos) return decodeOrReplace(codec, rest);
        bool ok = true;
        std::string out = convert(codec, rest.substr(0, delimiter), ok);
        out += convert(codecs_[0], rest.substr(delimiter), ok);
        return ok ? out : replacing(codecs_[0], fragment);
    }

    std::string decodeOrReplace(const std::string &codec, const std::string &bytes) {
        bool ok = true;
        std::string out = convert(codec, bytes, ok);
        return ok ? out : replacing(codecs_[0], bytes);
    }

    // Python's errors="replace": U+FFFD for each byte no character starts at.
    std::string replacing(const std::string &codec, const std::string &bytes) {
        std::string out;
        for (size_t i = 0; i < bytes.size();) {
            bool done = false;
            for (size_t n = 1; n <= 4 && i + n <= bytes.size() && !done; ++n) {
                bool ok = true;
                std::string piece = convert(codec, bytes.substr(i, n), ok);
                if (ok) {
                    out += piece;
                    i += n;
                    done = true;
                }
            }
            if (!done) {
                out += kReplacement;
                ++i;
            }
        }
        return out;
    }

    std::string convert(const std::string &codec, const std::string &bytes, bool &ok) {
        if (isLatin1(codec)) return latin1ToUtf8(bytes);
        OFCharacterEncoding *encoder = encoder_for(codec);
        OFString converted;
        if (encoder == nullptr ||
            encoder->convertString(bytes.data(), bytes.size(), converted).bad()) {
            ok = false;
            return "";
        }
        return std::string(converted.c_str(), converted.length());
    }

    OFCharacterEncoding *encoder_for(const std::string &codec) {
        for (auto &entry : encoders_)
            if (entry.first == codec) return entry.second.get();
        const char *name = lookup(kIconvNames, codec);
        auto encoder = std::make_unique<OFCharacterEncoding>();
        if (name == nullptr || encoder->selectEncoding(name, "UTF-8").bad())
            throw Unreadable(std::string("no character set conversion for ") + codec +
                             " (DCMTK built without iconv/ICU support for it)");
        encoders_.emplace_back(codec, std::move(encoder));
        return encoders_.back().second.get();
    }

    std::vector<std::string> codecs_;  // Python codec names, as pydicom's convert_encodings
    std::vector<std::pair<std::string, std::unique_ptr<OFCharacterEncoding>>> encoders_;
};

// --- elements ----------------------------------------------------------------------------------

const std::string &vrKind(const std::string &vr) {
    static const std::string text = "text", integer = "int", none;
    static const char *const texts[] = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN",
                                        "SH", "ST", "TM", "UC", "UI", "UR", "UT"};
    static const char *const ints[] = {"IS", "US", "UL", "SS", "SL", "SV", "UV"};
    if (inList(vr, texts)) return text;
    if (inList(vr, ints)) return integer;
    if (vr == "DS" || vr == "FL" || vr == "FD" || vr == "AT") return vr;
    return none;
}

bool isCharsetVR(const std::string &vr) {
    return vr == "LO" || vr == "LT" || vr == "PN" || vr == "SH" || vr == "ST" || vr == "UC" ||
           vr == "UT";
}

// The single value, or a list; empty (no output) when every value is empty.
std::string pack(const std::vector<Json> &values) {
    bool allEmpty = true;
    for (const Json &v : values) allEmpty = allEmpty && v.empty;
    if (values.empty() || allEmpty) return "";
    if (values.size() == 1) return values[0].text;
    std::string out = "[";
    for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + values[i].text;
    return out + "]";
}

std::string personName(const std::string &value) {
    std::vector<std::string> groups = split(value, '=');
    while (!groups.empty() && groups.back().empty()) groups.pop_back();
    std::string out;
    for (size_t i = 0; i < groups.size(); ++i) out += (i ? "=" : "") + groups[i];
    return out;
}

std::vector<Json> textValues(const std::string &vr, const std::string &raw, TextDecoder &text) {
    std::vector<Json> values;
    if (!isCharsetVR(vr)) {
        std::string decoded = latin1ToUtf8(raw);
        if (vr == "AE") {
            for (const std::string &item : split(decoded, '\\'))
                values.push_back(textValue(pyStrip(item)));
        } else if (vr == "UR") {
            size_t e = decoded.size();
            while (e > 0 && isPySpace(static_cast<unsigned char>(decoded[e - 1]))) --e;
            values.push_back(textValue(decoded.substr(0, e)));
        } else {
            for (const std::string &item : split(rstripSpaceNul(decoded), '\\'))
                values.push_back(textValue(item));
        }
        return values;
    }
    if (vr == "PN") {
        for (const std::string &item : split(text.decode(rstripSpaceNul(raw)), '\\'))
            values.push_back(textValue(personName(item)));
        return values;
    }
    std::string decoded = text.decode(raw);
    if (vr == "LT" || vr == "ST" || vr == "UT") {
        values.push_back(textValue(rstripSpaceNul(decoded)));
    } else {
        for (const std::string &item : split(decoded, '\\'))
            values.push_back(textValue(rstripSpaceNul(item)));
    }
    return values;
}

std::string hexTag(Uint16 group, Uint16 element) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%04X,%04X", group, element);
    return buf;
}

// Binary numbers from raw little-endian bytes (an element read as UN).
template <typename T>
std::vector<T> unpackLE(const std::string &raw) {
    std::vector<T> out(raw.size() / sizeof(T));
    for (size_t i = 0; i < out.size(); ++i) {
        uint64_t bits = 0;
        for (size_t b = 0; b < sizeof(T); ++b) {
            unsigned char byte = static_cast<unsigned char>(raw[i * sizeof(T) + b]);
            bits |= static_cast<uint64_t>(byte) << (8 * b);
        }
        T value;
        if constexpr (sizeof(T) == 8) {
            std::memcpy(&value, &bits, 8);
        } else if constexpr (sizeof(T) == 4) {
            uint32_t narrow = static_cast<uint32_t>(bits);
            std::memcpy(&value, &narrow, 4);
        } else {
            uint16_t narrow = static_cast<uint16_t>(bits);
            std::memcpy(&value, &narrow, 2);
        }
        out[i] = value;
    }
    return out;
}

template <typename T>
std::vector<Json> intValues(const std::vector<T> &numbers) {
    std::vector<Json> values;
    for (T n : numbers) values.push_back(Json{std::to_string(n)});
    return values;
}

template <typename T>
std::vector<Json> floatValues(const std::vector<T> &numbers, bool isFL) {
    std::vector<Json> values;
    for (T n : numbers) values.push_back(binaryFloat(static_cast<double>(n), isFL));
    return values;
}

// Binary VRs from their little-endian bytes; empty when not a whole number of values.
std::vector<Json> binaryValues(const std::string &vr, const std::string &raw) {
    static const std::pair<const char *, size_t> sizes[] = {
        {"US", 2}, {"SS", 2}, {"UL", 4}, {"SL", 4}, {"FL", 4},
        {"AT", 4}, {"FD", 8}, {"SV", 8}, {"UV", 8}};
    size_t size = 0;
    for (const auto &entry : sizes)
        if (vr == entry.first) size = entry.second;
    if (size == 0 || raw.size() % size != 0) return {};
    if (vr == "US") return intValues(unpackLE<uint16_t>(raw));
    if (vr == "SS") return intValues(unpackLE<int16_t>(raw));
    if (vr == "UL") return intValues(unpackLE<uint32_t>(raw));
    if (vr == "SL") return intValues(unpackLE<int32_t>(raw));
    if (vr == "UV") return intValues(unpackLE<uint64_t>(raw));
    if (vr == "SV") return intValues(unpackLE<int64_t>(raw));
    if (vr == "FL") return floatValues(unpackLE<float>(raw), true);
    if (vr == "FD") return floatValues(unpackLE<double>(raw), false);
    std::vector<Json> values;  // AT
    std::vector<uint16_t> words = unpackLE<uint16_t>(raw);
    for (size_t i = 0; i + 1 < words.size(); i += 2)
        values.push_back(textValue(hexTag(words[i], words[i + 1])));
    return values;
}

// Points `data` at the values of a binary element, through the getter of its own class
// (DCMTK answers EC_IllegalCall for the others).
OFCondition binaryArray(DcmElement &element, const std::string &vr, void *&data) {
    OFCondition status = EC_IllegalCall;
    if (vr == "US" || vr == "AT") {
        Uint16 *values = nullptr;
        status = element.getUint16Array(values);
        data = values;
    } else if (vr == "SS") {
        Sint16 *values = nullptr;
        status = element.getSint16Array(values);
        data = values;
    } else if (vr == "UL") {
        Uint32 *values = nullptr;
        status = element.getUint32Array(values);
        data = values;
    } else if (vr == "SL") {
        Sint32 *values = nullptr;
        status = element.getSint32Array(values);
        data = values;
    } else if (vr == "FL") {
        Float32 *values = nullptr;
        status = element.getFloat32Array(values);
        data = values;
    } else if (vr == "FD") {
        Float64 *values = nullptr;
        status = element.getFloat64Array(values);
        data = values;
    } else if (vr == "UV") {
        Uint64 *values = nullptr;
        status = element.getUint64Array(values);
        data = values;
    } else if (vr == "SV") {
        Sint64 *values = nullptr;
        status = element.getSint64Array(values);
        data = values;
    }
    return status;
}

// The little-endian bytes of a binary element (DCMTK holds it in machine byte order).
std::string binaryBytes(DcmElement &element, const std::string &vr) {
    void *data = nullptr;
    if (binaryArray(element, vr, data).bad() || data == nullptr) return {};
    std::string raw(static_cast<const char *>(data), element.getLength());
    size_t size = (vr == "US" || vr == "SS" || vr == "AT")                ? 2
                  : (vr == "UL" || vr == "SL" || vr == "FL")              ? 4
                                                                          : 8;
    if (gLocalByteOrder == EBO_BigEndian)
        for (size_t i = 0; i + size <= raw.size(); i += size)
            std::reverse(raw.begin() + i, raw.begin() + i + size);
    return raw;
}

// The sidecar JSON of one element; empty when it is to be left out.
std::string elementJson(DcmElement &element, TextDecoder &text) {
    DcmTag tag = element.getTag();
    DcmEVR evr = element.getVR();
    std::string vr = DcmVR(evr).getVRName();
    bool raw = false;
    if (evr == EVR_UN) {  // pydicom reads UN by the dictionary's VR
        const DcmDataDictionary &dict = dcmDataDict.rdlock();
        const DcmDictEntry *entry = dict.findEntry(tag.getXTag(), tag.getPrivateCreator());
        vr = entry != nullptr ? DcmVR(entry->getEVR()).getVRName() : "UN";
        dcmDataDict.rdunlock();
        raw = true;
    }
    if (vr == "xs" || vr == "US or SS") vr = "US";
    const std::string &kind = vrKind(vr);
    if (kind.empty() || element.getLength() == 0) return "";
    std::string bytes;
    if (raw) {
        Uint8 *data = nullptr;
        if (element.getUint8Array(data).bad() || data == nullptr) return "";
        bytes.assign(reinterpret_cast<char *>(data), element.getLength());
    } else if (element.isaString()) {
        char *data = nullptr;
        Uint32 length = 0;
        if (element.getString(data, length).bad() || data == nullptr) return "";
        bytes.assign(data, length);
    } else {
        bytes = binaryBytes(element, vr);
    }
    if (kind == "text") return pack(textValues(vr, bytes, text));
    if (vr == "IS") {
        std::vector<Json> values;
        for (const std::string &item : split(rstripSpaceNul(latin1ToUtf8(bytes)), '\\'))
            values.push_back(intFromText(item));
        return pack(values);
    }
    if (vr == "DS") {
        std::vector<Json> values;
        for (const std::string &item : split(rstripSpaceNul(pyStrip(latin1ToUtf8(bytes))), '\\'))
            values.push_back(floatFromText(item));
        return pack(values);
    }
    return pack(binaryValues(vr, bytes));
}

// (keyword, serialized JSON value) of one file, in sidecar order.
using Fields = std::vector<std::pair<std::string, std::string>>;

// The sidecar fields of one file; throws Unreadable.
Fields sidecarFields(const char *path) {
    struct stat info;
    if (stat(path, &info) != 0) throw Unreadable(std::strerror(errno));
    if (S_ISDIR(info.st_mode)) throw Unreadable(std::strerror(EISDIR));
    if (info.st_size == 0) throw Unreadable("not a DICOM file: empty");
    DcmFileFormat file;
    OFCondition status = file.loadFileUntilTag(path, EXS_Unknown, EGL_noChange, DCM_MaxReadLength,
                                               ERM_autoDetect, kStopAt);
    if (status.bad())
        throw Unreadable(std::string("cannot parse DICOM data (") + status.text() + ")");
    DcmDataset *dataset = file.getDataset();
    DcmMetaInfo *meta = file.getMetaInfo();
    std::string charset;
    bool hasCharset = false;
    DcmElement *element = nullptr;
    if (dataset->findAndGetElement(DCM_SpecificCharacterSet, element, OFFalse).good() && element) {
        char *data = nullptr;
        Uint32 length = 0;
        if (element->getString(data, length).good() && data != nullptr) {
            charset.assign(data, length);
            hasCharset = true;
        }
    }
    TextDecoder text(hasCharset ? &charset : nullptr);
    Fields out;
    for (const Field &field : kSidecar) {
        DcmTagKey key(field.group, field.element);
        element = nullptr;
        if (dataset->findAndGetElement(key, element, OFFalse).bad() || element == nullptr) {
            element = nullptr;
            if (meta == nullptr || meta->findAndGetElement(key, element, OFFalse).bad()) continue;
        }
        if (element == nullptr) continue;
        std::string value = elementJson(*element, text);
        if (value.empty()) continue;
        out.emplace_back(field.keyword, value);
    }
    if (out.empty()) throw Unreadable("no DICOM attributes found");
    return out;
}

std::string toJson(const Fields &fields) {
    std::string out;
    for (const auto &field : fields)
        out += (out.empty() ? "{" : ",") + jsonString(field.first) + ":" + field.second;
    return out.empty() ? "{}" : out + "}";
}

// The sidecar line of one file; throws Unreadable.
std::string sidecar(const char *path) { return toJson(sidecarFields(path)); }

// --- publish mode: the spool protocol of mercli/spool.py, as mercli/receiver.py follows it ----

// Crash points for tests (--inject-error N): the process _exit(70)s there, as if killed.
int gInject = 0;

void crashPoint(int n) {
    if (gInject == n) _exit(70);
}

// SHA-256 (FIPS 180-4), for safe names.
std::string sha256Hex(const std::string &message) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::string data = message;
    uint64_t bits = static_cast<uint64_t>(message.size()) * 8;
    data += static_cast<char>(0x80);
    while (data.size() % 64 != 56) data += '\0';
    for (int i = 7; i >= 0; --i) data += static_cast<char>((bits >> (8 * i)) & 0xff);
    auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
    for (size_t chunk = 0; chunk < data.size(); chunk += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; ++i) {
            const unsigned char *p =
                reinterpret_cast<const unsigned char *>(data.data() + chunk + 4 * i);
            w[i] = (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
        }
        for (int i = 16; i < 64; ++i) {
            uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        for (int i = 0; i < 64; ++i) {
            uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
            uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
    }
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h[i]);
    return std::string(out, 64);
}

// mercli.names.safe_name: a UID (digits and dots, <= 64 chars) as is, else x + hash.
std::string safeName(const std::string &value) {
    bool ok = !value.empty() && value.size() <= 64;
    bool digitBefore = false;
    for (char c : value) {
        if (!ok) break;
        if (c >= '0' && c <= '9') {
            digitBefore = true;
        } else if (c == '.' && digitBefore) {
            digitBefore = false;
        } else {
            ok = false;
        }
    }
    if (ok && digitBefore) return value;
    return "x" + sha256Hex(value).substr(0, 40);
}

// Reads the JSON string starting at s[i] (a '"'); the decoded UTF-8 text.
std::string readJsonString(const std::string &s, size_t &i) {
    std::string out;
    ++i;
    while (i < s.size() && s[i] != '"') {
        if (s[i] != '\\') {
            out += s[i++];
            continue;
        }
        char c = s[++i];
        ++i;
        switch (c) {
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                unsigned cp = std::stoul(s.substr(i, 4), nullptr, 16);
                i += 4;
                if (cp < 0x80) {
                    out += static_cast<char>(cp);
                } else if (cp < 0x800) {
                    out += static_cast<char>(0xC0 | (cp >> 6));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                } else {
                    out += static_cast<char>(0xE0 | (cp >> 12));
                    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                }
                break;
            }
            default: out += c;
        }
    }
    ++i;  // closing quote
    return out;
}

// Python's repr() of a str (printable text assumed beyond ASCII control characters).
std::string pyRepr(const std::string &s) {
    char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"'
                                                                                        : '\'';
    std::string out(1, quote);
    for (unsigned char c : s) {
        if (c == '\\' || c == static_cast<unsigned char>(quote)) {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + quote;
}

// Python's str() of a sidecar value given as JSON: a string, a number, or a list of them.
std::string pyStr(const std::string &json) {
    size_t i = 0;
    if (json.empty()) return json;
    if (json[0] == '"') return readJsonString(json, i);
    if (json[0] != '[') return json;  // numbers: jsonFloat writes repr()
    std::string out = "[";
    i = 1;
    while (i < json.size() && json[i] != ']') {
        if (out.size() > 1) out += ", ";
        if (json[i] == '"') {
            out += pyRepr(readJsonString(json, i));
        } else {
            size_t end = json.find_first_of(",]", i);
            out += json.substr(i, end - i);
            i = end;
        }
        if (i < json.size() && json[i] == ',') ++i;
    }
    return out + "]";
}

// JSON as Python's json.dumps(ensure_ascii=True) writes a str (bad UTF-8 as surrogateescape).
std::string jsonAscii(const std::string &s) {
    std::string out = "\"";
    auto u = [&out](unsigned cp) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "\\u%04x", cp);
        out += buf;
    };
    for (size_t i = 0; i < s.size();) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == 0x7f) {
            u(c);
            ++i;
            continue;
        }
        if (c < 0x80) {
            std::string one = jsonString(std::string(1, static_cast<char>(c)));
            out += one.substr(1, one.size() - 2);
            ++i;
            continue;
        }
        int n = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
        unsigned cp = n == 4 ? c & 0x07 : n == 3 ? c & 0x0F : c & 0x1F;
        bool ok = n > 0 && i + n <= s.size();
        for (int k = 1; ok && k < n; ++k) {
            unsigned char cc = static_cast<unsigned char>(s[i + k]);
            ok = (cc & 0xC0) == 0x80;
            cp = (cp << 6) | (cc & 0x3F);
        }
        ok = ok && !(n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp < 0xE000))) &&
             !(n == 4 && (cp < 0x10000 || cp > 0x10FFFF));
        if (!ok) {
            u(0xDC00 | c);
            ++i;
            continue;
        }
        if (cp >= 0x10000) {
            cp -= 0x10000;
            u(0xD800 | (cp >> 10));
            u(0xDC00 | (cp & 0x3FF));
        } else {
            u(cp);
        }
        i += n;
    }
    return out + "\"";
}

// --- time and ids --------------------------------------------------------------------------------

struct Clock {
    struct tm utc;
    long micros;
};

Clock now() {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    Clock clock;
    gmtime_r(&ts.tv_sec, &clock.utc);
    clock.micros = ts.tv_nsec / 1000;
    return clock;
}

// datetime.isoformat(timespec=...) of an aware UTC time: digits 0, 3 or 6.
std::string isoformat(const Clock &clock, int digits) {
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &clock.utc);
    std::string out = buf;
    if (digits == 3) {
        std::snprintf(buf, sizeof buf, ".%03ld", clock.micros / 1000);
        out += buf;
    } else if (digits == 6) {
        std::snprintf(buf, sizeof buf, ".%06ld", clock.micros);
        out += buf;
    }
    return out + "+00:00";
}

std::string randomHex(size_t bytes) {
    std::vector<unsigned char> raw(bytes);
    size_t got = 0;
    while (got < bytes) {
        ssize_t n = getrandom(raw.data() + got, bytes - got, 0);
        if (n < 0 && errno != EINTR) throw std::runtime_error("getrandom failed");
        if (n > 0) got += static_cast<size_t>(n);
    }
    std::string out;
    char buf[3];
    for (unsigned char c : raw) {
        std::snprintf(buf, sizeof buf, "%02x", c);
        out += buf;
    }
    return out;
}

// mercli.names.new_id: 20261128T002729.123456-3f9a1c2b7d4e
std::string newId() {
    Clock clock = now();
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%S", &clock.utc);
    char micros[16];
    std::snprintf(micros, sizeof micros, ".%06ld-", clock.micros);
    return buf + std::string(micros) + randomHex(6);
}

std::string nodename() {
    struct utsname name;
    if (uname(&name) != 0) return "";
    return name.nodename;
}

// mercli.names.owner_id("getdcmtags")
std::string ownerId() {
    std::string host = nodename();
    for (char &c : host)
        if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') c = '-';
    host = host.substr(0, 40);
    if (host.empty()) host = "host";
    return "getdcmtags." + host + "." + std::to_string(getpid()) + "." + randomHex(4);
}

// --- filesystem ----------------------------------------------------------------------------------

class SysError : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string &path) {
    throw SysError(std::string(std::strerror(errno)) + " (" + path + ")");
}

void fsyncPath(const std::string &path, bool directory) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
    if (fd < 0) fail(path);
    if (fsync(fd) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        fail(path);
    }
    close(fd);
}

void writeAll(int fd, const std::string &data, const std::string &path) {
    size_t done = 0;
    while (done < data.size()) {
        ssize_t n = write(fd, data.data() + done, data.size() - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(path);
        }
        done += static_cast<size_t>(n);
    }
}

// mercli.fsutil.write_new: create exclusively, write, fsync; unlinked again on failure.
void writeNew(const std::string &path, const std::string &data, bool sync = true) {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) fail(path);
    try {
        writeAll(fd, data, path);
        if (sync && fsync(fd) != 0) fail(path);
    } catch (...) {
        close(fd);
        unlink(path.c_str());
        throw;
    }
    if (close(fd) != 0) {
        unlink(path.c_str());
        fail(path);
    }
}

void renameNoReplace(const std::string &from, const std::string &to) {
    if (renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) fail(to);
}

void removeTree(const std::string &path) {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
}

bool isDir(const std::string &path) {
    struct stat info;
    return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// --- the spool -----------------------------------------------------------------------------------

struct ReceiveInfo {
    std::string callingAet, calledAet, address;
};

class Spool {
  public:
    explicit Spool(const std::string &root) : root_(root) {}

    // Checks the layout (creating missing folders, as Spool.open) and takes a lease.
    void open() {
        if (!isDir(root_)) {
            errno = ENOTDIR;
            fail(root_);
        }
        const char *folders[] = {"tmp",    "incoming", "outgoing", "success", "discard",
                                 "error",  "leases",   "claims",   "hints",   "events"};
        dev_t device = 0;
        for (const char *name : folders) {
            std::string folder = root_ + "/" + name;
            if (!isDir(folder)) {
                if (mkdir(folder.c_str(), 0755) != 0 && errno != EEXIST) fail(folder);
                fsyncPath(root_, true);
            }
            struct stat info;
            if (stat(folder.c_str(), &info) != 0) fail(folder);
            if (device != 0 && info.st_dev != device)
                throw SysError("spool folders span several filesystems (" + root_ + ")");
            device = info.st_dev;
        }
        rootFd_ = ::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (rootFd_ < 0) fail(root_);
        startLease();
    }

    // Worker.stop(): scratch, claims folder, then the lease (lock dropped on close).
    void close() {
        if (leaseFd_ < 0) return;
        removeTree(scratch_);
        removeTree(root_ + "/claims/" + owner_);
        unlink((root_ + "/leases/" + owner_).c_str());
        ::close(leaseFd_);
        leaseFd_ = -1;
    }

    // One staged file on its way through publishBatch.
    struct Entry {
        std::string path;
        ReceiveInfo info;
        std::string line;  // the answer printed for it
        bool ok = false;
        Fields fields;
        std::string series, instance, tags;
    };

    // Publishes a batch of staged files with two barriers for all of them, not three fsyncs
    // per file: every .dcm and .tags is written, then syncfs() makes all of them durable at
    // once (a file is renamed into incoming/ only when whole on disk), then all are renamed
    // in, then a second syncfs() makes the renames durable. Unreadable files are quarantined
    // one by one, as before. Returns whether every file went to incoming/.
    bool publishBatch(std::vector<Entry> &batch) {
        std::vector<Entry *> ready;
        for (Entry &entry : batch)
            if (prepare(entry)) ready.push_back(&entry);
        crashPoint(1);
        if (!ready.empty() && syncfs(rootFd_) != 0) failAll(ready, "syncfs (" + root_ + ")");
        for (Entry *entry : ready) {
            try {
                crashPoint(2);
                bool replaced = publishToGroup(entry->series, {{entry->path, entry->instance + ".dcm"},
                                                               {entry->tags, entry->instance + ".tags"}});
                entry->line = replaced ? "replaced" : "new";
                entry->ok = true;
            } catch (const SysError &error) {
                unlink(entry->tags.c_str());
                entry->line = std::string("fail ") + error.what();
            }
        }
        crashPoint(4);
        bool published = false;
        for (Entry *entry : ready) published = published || entry->ok;
        if (published && syncfs(rootFd_) != 0)
            std::cerr << "Warning: syncfs after publishing failed (" << std::strerror(errno) << ")\n";
        crashPoint(5);
        bool allOk = true;
        for (Entry &entry : batch) {
            if (!entry.ok) {
                allOk = false;
                continue;
            }
            logEvent("\"event\":\"received\",\"series\":" + jsonString(entry.series) +
                     ",\"instance\":" + jsonString(entry.instance) + ",\"sender\":" +
                     jsonString(entry.info.callingAet) + ",\"replaced\":" +
                     (entry.line == "replaced" ? "true" : "false"));
            entry.line = "ok " + entry.series + "/" + entry.instance;
        }
        return allOk;
    }

  private:
    // Reads the file's tags; quarantines it if unreadable, else writes its sidecar into
    // scratch (not yet synced). True when the entry is ready to be renamed in.
    bool prepare(Entry &entry) {
        std::string reason;
        int status = 0;
        try {
            entry.fields = sidecarFields(entry.path.c_str());
            std::vector<std::string> missing;
            for (const char *uid : {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}) {
                bool found = false;
                for (const auto &field : entry.fields) found = found || field.first == uid;
                if (!found) missing.push_back(uid);
            }
            for (size_t i = 0; i < missing.size(); ++i)
                reason += (i ? ", " : "missing ") + missing[i];
            if (!missing.empty()) status = 0xC212;
        } catch (const Unreadable &error) {
            reason = error.what();
            status = 0xC210;
        }
        try {
            struct stat st;
            if (lstat(entry.path.c_str(), &st) != 0) fail(entry.path);
            if (!S_ISREG(st.st_mode)) throw SysError("not a regular file (" + entry.path + ")");
            if (status != 0) {
                crashPoint(1);
                fsyncPath(entry.path, false);
                std::string item = quarantine(entry.path, reason, status, entry.info);
                entry.line = "error " + item + " " + reason;
                return false;
            }
            for (const auto &field : entry.fields) {
                if (field.first == "SeriesInstanceUID") entry.series = safeName(pyStr(field.second));
                if (field.first == "SOPInstanceUID") entry.instance = safeName(pyStr(field.second));
            }
            std::string sidecar = toJson(entry.fields);
            sidecar.insert(sidecar.size() - 1, metadataJson(entry.info));
            entry.tags = tmpPath();
            writeNew(entry.tags, sidecar, false);
            return true;
        } catch (const SysError &error) {
            entry.line = std::string("fail ") + error.what();
            return false;
        }
    }

    void failAll(std::vector<Entry *> &ready, const std::string &what) {
        std::string reason = std::string(std::strerror(errno)) + " " + what;
        for (Entry *entry : ready) {
            unlink(entry->tags.c_str());
            entry->line = "fail " + reason + " (" + entry->path + ")";
        }
        ready.clear();
    }

    std::string tmpPath() {
        return scratch_ + "/" + std::to_string(++counter_) + "." + newId();
    }

    void startLease() {
        owner_ = ownerId();
        std::string born = root_ + "/tmp/lease." + owner_;
        int fd = ::open(born.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) fail(born);
        try {
            if (flock(fd, LOCK_EX) != 0) fail(born);
            std::string record = "{\"role\": \"getdcmtags\", \"host\": " + jsonAscii(nodename()) +
                                 ", \"pid\": " + std::to_string(getpid()) + ", \"started\": \"" +
                                 isoformat(now(), 0) + "\"}";
            writeAll(fd, record, born);
            if (fsync(fd) != 0) fail(born);
            crashPoint(7);
            renameNoReplace(born, root_ + "/leases/" + owner_);
            fsyncPath(root_ + "/leases", true);
            scratch_ = root_ + "/tmp/" + owner_;
            if (mkdir(scratch_.c_str(), 0755) != 0) fail(scratch_);
            std::string claims = root_ + "/claims/" + owner_;
            if (mkdir(claims.c_str(), 0755) != 0) fail(claims);
        } catch (...) {
            ::close(fd);
            unlink(born.c_str());
            throw;
        }
        leaseFd_ = fd;
    }

    std::string metadataJson(const ReceiveInfo &info) {
        return ",\"SenderAET\":" + jsonString(info.callingAet) +
               ",\"SenderAddress\":" + jsonString(info.address) +
               ",\"ReceiverAET\":" + jsonString(info.calledAet) + ",\"ReceivedAt\":\"" +
               isoformat(now(), 3) + "\"";
    }

    // Spool.publish_to_group (protocol step 2).
    bool publishToGroup(const std::string &group,
                        const std::vector<std::pair<std::string, std::string>> &files) {
        std::string incoming = root_ + "/incoming";
        std::string directory = incoming + "/" + group;
        for (;;) {
            if (mkdir(directory.c_str(), 0755) == 0) {
                fsyncPath(incoming, true);
            } else if (errno != EEXIST) {
                fail(directory);
            }
            int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0) {
                if (errno == ENOENT || errno == ENOTDIR) continue;
                fail(directory);
            }
            try {
                if (flock(fd, LOCK_SH) != 0) fail(directory);
                struct stat current, mine;
                if (lstat(directory.c_str(), &current) != 0 || fstat(fd, &mine) != 0 ||
                    current.st_ino != mine.st_ino || current.st_dev != mine.st_dev) {
                    ::close(fd);
                    continue;  // claimed away between mkdir and lock: make a new group
                }
                bool replaced = false;
                for (size_t i = 0; i < files.size(); ++i) {
                    if (i == 1) crashPoint(3);
                    struct stat existing;
                    if (fstatat(fd, files[i].second.c_str(), &existing, AT_SYMLINK_NOFOLLOW) == 0)
                        replaced = true;
                    if (renameat(AT_FDCWD, files[i].first.c_str(), fd, files[i].second.c_str()) !=
                        0)
                        fail(directory + "/" + files[i].second);
                }
                ::close(fd);
                return replaced;
            } catch (...) {
                ::close(fd);
                throw;
            }
        }
    }

    // receiver._quarantine: error/<id>/instance.dcm + error.json, built in scratch.
    std::string quarantine(const std::string &path, const std::string &reason, int status,
                           const ReceiveInfo &info) {
        std::string item = newId();
        std::string folder = tmpPath();
        if (mkdir(folder.c_str(), 0755) != 0) fail(folder);
        std::string instance = folder + "/instance.dcm";
        bool moved = false;
        try {
            if (rename(path.c_str(), instance.c_str()) != 0) fail(path);
            moved = true;
            char code[16];
            std::snprintf(code, sizeof code, "0x%04X", status);
            std::string record = "{\n \"reason\": " + jsonAscii(reason) + ",\n \"at\": \"" +
                                 isoformat(now(), 0) + "\",\n \"from\": \"receive\",\n" +
                                 " \"status\": \"" + code + "\",\n \"SenderAET\": " +
                                 jsonAscii(info.callingAet) + ",\n \"SenderAddress\": " +
                                 jsonAscii(info.address) + ",\n \"ReceiverAET\": " +
                                 jsonAscii(info.calledAet) + ",\n \"ReceivedAt\": \"" +
                                 isoformat(now(), 3) + "\"\n}";
            writeNew(folder + "/error.json", record);
            crashPoint(6);
            fsyncPath(folder, true);
            std::string errors = root_ + "/error";
            renameNoReplace(folder, errors + "/" + item);
            fsyncPath(errors, true);
        } catch (...) {
            if (moved) rename(instance.c_str(), path.c_str());  // give the file back
            removeTree(folder);
            throw;
        }
        logEvent("\"event\":\"quarantined\",\"item\":" + jsonString(item) + ",\"reason\":" +
                 jsonString(reason) + ",\"sender\":" + jsonString(info.callingAet));
        return item;
    }

    // EventLog.append: one line, one write(2), O_APPEND; failures only warned about.
    void logEvent(const std::string &body) {
        Clock clock = now();
        char day[32];
        std::strftime(day, sizeof day, "%Y-%m-%d", &clock.utc);
        std::string line = "{\"at\":\"" + isoformat(clock, 6) + "\"," + body + "}\n";
        std::string file = root_ + "/events/" + day + ".ndjson";
        int fd = ::open(file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
            std::cerr << "Warning: event log unwritable (" << std::strerror(errno) << ")\n";
        if (fd >= 0) ::close(fd);
    }

    std::string root_;
    std::string owner_;
    std::string scratch_;
    int leaseFd_ = -1;
    int rootFd_ = -1;
    unsigned counter_ = 0;
};

const char kUsage[] =
    "Usage: getdcmtags FILE...\n"
    "       getdcmtags --publish --spool DIR --calling-aet AE --called-aet AE --address ADDR\n"
    "                  [--stdin] [--inject-error N] [FILE...]\n"
    "       getdcmtags --publish --spool DIR --stdin [--inject-error N]\n";

const char kHelp[] =
    "\n"
    "Without --publish: print the sidecar JSON of each FILE, one line each (as `mercli tags`).\n"
    "\n"
    "--publish: move each FILE (a complete Part 10 file on the spool's filesystem, e.g. what\n"
    "storescp wrote into a staging folder) into DIR/incoming/<series>/ with its sidecar, as\n"
    "`mercli receive` does: .tags written in the process' scratch folder tmp/<owner>/ (under a\n"
    "lease in leases/<owner>), .dcm and .tags made durable, both renamed in under a shared lock\n"
    "on the series folder, the renames made durable, a \"received\" event logged. Files come in\n"
    "batches (all the lines waiting on stdin, up to 256): one syncfs() before the renames and one\n"
    "after serve the whole batch. A file without\n"
    "SOP/Series/Study Instance UID (status 0xC212) or that cannot be parsed (0xC210) goes to\n"
    "DIR/error/<id>/ (instance.dcm + error.json with the reason) with a \"quarantined\" event.\n"
    "One line per file on stdout, flushed:\n"
    "  ok <series>/<instance>      published\n"
    "  error <id> <reason>         quarantined as error/<id>\n"
    "  fail <reason> (<path>)      not published (write error, missing file): file left as is\n"
    "--stdin: after the FILE arguments, read one line per file from stdin until EOF: either\n"
    "  PATH (sender from the options) or PATH<TAB>CALLING-AE<TAB>CALLED-AE<TAB>ADDRESS, so one\n"
    "  process serves files from many associations (mercli receive --engine dcmtk).\n"
    "Exit: 0 all published, 1 some quarantined or failed, 2 usage, 4 spool unusable.\n"
    "\n"
    "--inject-error N: crash (_exit(70), nothing cleaned up) at point N, for tests:\n"
    "  1  before the batch's files are synced (nothing in the spool yet)\n"
    "  2  after the .tags is written in tmp/<owner>/ and synced, before the series folder is\n"
    "     locked\n"
    "  3  after the .dcm is renamed into incoming/<series>/, before the .tags is\n"
    "  4  after the renames of the batch, before they are synced\n"
    "  5  after publishing, before the \"received\" event is logged\n"
    "  6  quarantine: error/<id> built in tmp/<owner>/, before it is renamed into error/\n"
    "  7  at start: lease written as tmp/lease.<owner>, before it is renamed into leases/\n";

// Reads lines from a file descriptor in batches: next() blocks until at least one complete
// line (or EOF) and returns every complete line available at that moment, at most kMax.
class LineReader {
  public:
    explicit LineReader(int fd) : fd_(fd) {}

    bool next(std::vector<std::string> &lines) {
        lines.clear();
        while (!eof_ && buffer_.find('\n') == std::string::npos) fill();
        for (;;) {
            size_t start = 0;
            for (size_t end; lines.size() < kMax && (end = buffer_.find('\n', start)) != std::string::npos;
                 start = end + 1)
                lines.push_back(buffer_.substr(start, end - start));
            buffer_.erase(0, start);
            if (lines.size() >= kMax || eof_ || !readable()) break;
            fill();
        }
        if (eof_ && !buffer_.empty() && lines.size() < kMax) {
            lines.push_back(buffer_);
            buffer_.clear();
        }
        return !lines.empty() || !eof_;
    }

  private:
    static constexpr size_t kMax = 256;

    void fill() {
        char chunk[65536];
        ssize_t n = read(fd_, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) return;
        if (n <= 0) {
            eof_ = true;
            return;
        }
        buffer_.append(chunk, static_cast<size_t>(n));
    }

    bool readable() {
        struct pollfd pfd = {fd_, POLLIN, 0};
        return poll(&pfd, 1, 0) > 0;
    }

    int fd_;
    bool eof_ = false;
    std::string buffer_;
};

std::vector<std::string> splitTabs(const std::string &line) {
    std::vector<std::string> fields;
    size_t start = 0;
    for (size_t tab; (tab = line.find('\t', start)) != std::string::npos; start = tab + 1)
        fields.push_back(line.substr(start, tab - start));
    fields.push_back(line.substr(start));
    return fields;
}

int publishMain(int argc, char *argv[]) {
    std::string spoolDir;
    ReceiveInfo info;
    bool haveCalling = false, haveCalled = false, haveAddress = false, fromStdin = false;
    std::vector<std::string> files;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&](bool &seen) -> std::string {
            if (i + 1 >= argc) {
                std::cerr << "Error: " << arg << " needs a value\n" << kUsage;
                std::exit(2);
            }
            seen = true;
            return argv[++i];
        };
        bool seen = false;
        if (arg == "--publish") {
        } else if (arg == "--stdin") {
            fromStdin = true;
        } else if (arg == "--spool") {
            spoolDir = value(seen);
        } else if (arg == "--calling-aet") {
            info.callingAet = value(haveCalling);
        } else if (arg == "--called-aet") {
            info.calledAet = value(haveCalled);
        } else if (arg == "--address") {
            info.address = value(haveAddress);
        } else if (arg == "--inject-error") {
            gInject = std::atoi(value(seen).c_str());
        } else if (arg == "--") {
            for (++i; i < argc; ++i) files.push_back(argv[i]);
        } else if (arg.size() > 1 && arg[0] == '-') {
            std::cerr << "Error: unknown option " << arg << "\n" << kUsage;
            return 2;
        } else {
            files.push_back(arg);
        }
    }
    bool haveSender = haveCalling && haveCalled && haveAddress;
    if (spoolDir.empty() || (files.empty() && !fromStdin) || (!files.empty() && !haveSender)) {
        std::cerr << "Error: --publish needs --spool, and files with --calling-aet, --called-aet "
                     "and --address, or --stdin\n"
                  << kUsage;
        return 2;
    }
    Spool spool(spoolDir);
    try {
        spool.open();
    } catch (const std::exception &error) {
        std::cerr << "Error: spool unusable: " << error.what() << "\n";
        return 4;
    }
    int exitCode = 0;
    auto run = [&](std::vector<Spool::Entry> &batch) {
        if (batch.empty()) return;
        if (!spool.publishBatch(batch)) exitCode = 1;
        for (const auto &entry : batch) std::cout << entry.line << '\n';
        std::cout.flush();  // a supervisor reads the answers as they come
        batch.clear();
    };
    std::vector<Spool::Entry> batch;
    for (const std::string &path : files) batch.push_back({path, info, "", false, {}, "", "", ""});
    run(batch);
    if (fromStdin) {
        LineReader reader(0);
        std::vector<std::string> lines;
        while (reader.next(lines)) {  // every complete line available now: one batch
            for (std::string &line : lines) {
                if (!line.empty() && line.back() == '\r') line.pop_back();
                if (line.empty()) continue;
                std::vector<std::string> fields = splitTabs(line);
                if (fields.size() == 4) {
                    ReceiveInfo sender{fields[1], fields[2], fields[3]};
                    batch.push_back({fields[0], sender, "", false, {}, "", "", ""});
                } else if (fields.size() == 1 && haveSender) {
                    batch.push_back({fields[0], info, "", false, {}, "", "", ""});
                } else {
                    run(batch);  // keep the answers in input order
                    exitCode = 1;
                    std::cout << "fail want PATH or PATH<TAB>CALLING<TAB>CALLED<TAB>ADDRESS ("
                              << fields[0] << ")" << std::endl;
                }
            }
            run(batch);
        }
    }
    spool.close();
    return exitCode;
}

}  // namespace

int main(int argc, char *argv[]) {
    bool publish = false;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << kUsage << kHelp;
            return 0;
        }
        publish = publish || arg == "--publish";
    }
    if (argc < 2) {
        std::cerr << kUsage;
        return 2;
    }
    OFLog::configure(OFLogger::FATAL_LOG_LEVEL);
    dcmEnableAutomaticInputDataCorrection.set(OFFalse);  // keep values as stored: we trim
    dcmAcceptUnexpectedImplicitEncoding.set(OFTrue);  // as pydicom: implicit VR despite the TS
    if (!dcmDataDict.isDictionaryLoaded()) {
        std::cerr << "Error: no DICOM data dictionary loaded (" DCM_DICT_DEFAULT_PATH ")\n";
        return 1;
    }
    if (publish) return publishMain(argc, argv);
    int exitCode = 0;
    for (int i = 1; i < argc; ++i) {
        try {
            std::string line = sidecar(argv[i]);
            std::cout << line << '\n';
        } catch (const Unreadable &error) {
            std::cout.flush();
            std::cerr << "Error: " << error.what() << " (" << argv[i] << ")\n";
            exitCode = 1;
        }
    }
    std::cout.flush();
    return exitCode;
}
