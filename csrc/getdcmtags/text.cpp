// JSON values and Python's number parsing; see text.h.

#include "text.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace getdcmtags {

// --- JSON values -------------------------------------------------------------------------------

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
bool startsWith(const std::string &s, const char *prefix) {
    return s.compare(0, std::strlen(prefix), prefix) == 0;
}

}  // namespace getdcmtags
