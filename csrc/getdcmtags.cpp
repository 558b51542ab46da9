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

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <memory>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
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

// The sidecar line of one file; throws Unreadable.
std::string sidecar(const char *path) {
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
    std::string out;
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
        out += (out.empty() ? "{" : ",") + jsonString(field.keyword) + ":" + value;
    }
    if (out.empty()) throw Unreadable("no DICOM attributes found");
    return out + "}";
}

}  // namespace

int main(int argc, char *argv[]) {
    if (argc < 2) {
        std::cerr << "Usage: getdcmtags FILE...\n";
        return 2;
    }
    OFLog::configure(OFLogger::FATAL_LOG_LEVEL);
    dcmEnableAutomaticInputDataCorrection.set(OFFalse);  // keep values as stored: we trim
    dcmAcceptUnexpectedImplicitEncoding.set(OFTrue);  // as pydicom: implicit VR despite the TS
    if (!dcmDataDict.isDictionaryLoaded()) {
        std::cerr << "Error: no DICOM data dictionary loaded (" DCM_DICT_DEFAULT_PATH ")\n";
        return 1;
    }
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
