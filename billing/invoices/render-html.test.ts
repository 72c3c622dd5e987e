import { expect, test } from "bun:test";
import type { Invoice } from "../store/types.ts";
import { roundingRule } from "./build.ts";
import { renderInvoiceHtml } from "./render-html.ts";

const script = "<script>alert(1)</script>";

const invoice: Invoice = {
  id: "inv_01",
  orgId: "org_01",
  orgName: script,
  number: "INV-2026-03-0001",
  status: "issued",
  periodStart: new Date("2026-03-01T00:00:00Z"),
  periodEnd: new Date("2026-04-01T00:00:00Z"),
  lines: [
    {
      description: `"><img src=x onerror=alert(2)>: input tokens`,
      model: `"><img src=x onerror=alert(2)>`,
      tokenType: "input",
      quantity: 1_234_567n,
      amountNanos: 3_086_417_500n,
      discountRuleId: null,
    },
    {
      description: "Discount: <b>Spring</b> & 'friends' (10% off)",
      model: "",
      tokenType: "discount",
      quantity: 0n,
      amountNanos: -308_641_750n,
      discountRuleId: "disc_1",
    },
  ],
  subtotalCents: 309n,
  discountCents: 31n,
  taxCents: 53n,
  totalCents: 331n,
  taxRateBps: 1900,
  createdAt: new Date("2026-04-01T01:00:00Z"),
  issuedAt: new Date("2026-04-02T09:00:00Z"),
};

test("every value is escaped: an org, model or rule name full of markup renders as text", () => {
  const page = renderInvoiceHtml(invoice);
  expect(page).not.toContain("<script");
  expect(page).not.toContain("<img");
  expect(page).not.toContain("<b>");
  expect(page).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
  expect(page).toContain("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;: input tokens");
  expect(page).toContain("Discount: &lt;b&gt;Spring&lt;/b&gt; &amp; &#39;friends&#39; (10% off)");
  // The title is escaped too.
  expect(page).toContain("<title>Invoice INV-2026-03-0001: &lt;script&gt;alert(1)&lt;/script&gt;</title>");
});

test("a printable page with the period, lines, totals and the rounding rule", () => {
  const page = renderInvoiceHtml({ ...invoice, orgName: "Acme" });
  expect(page).toStartWith("<!doctype html>");
  expect(page).toContain("@media print");
  expect(page).toContain("2026-03-01 to 2026-03-31");
  expect(page).toContain("1,234,567");
  expect(page).toContain("$3.0864175");
  expect(page).toContain("-$0.30864175");
  expect(page).toContain("<td>Subtotal</td><td class=\"num\">$3.09</td>");
  expect(page).toContain("<td>Discounts</td><td class=\"num\">-$0.31</td>");
  expect(page).toContain("<td>Tax (19%)</td><td class=\"num\">$0.53</td>");
  expect(page).toContain("<td>Total due</td><td class=\"num\">$3.31</td>");
  expect(page).toContain(roundingRule);
  expect(page).toContain("2026-04-02");

  const empty = renderInvoiceHtml({ ...invoice, number: null, lines: [], status: "draft", issuedAt: null });
  expect(empty).toContain("<title>Draft invoice: ");
  expect(empty).toContain("No usage in this period.");
  expect(empty).toContain("not yet issued");
  expect(empty).toContain('class="status status-draft">draft<');
});

test("line amounts are exact and printed as the totals are: grouped, with at least the cents", () => {
  const line = (amountNanos: bigint, tokenType: Invoice["lines"][number]["tokenType"] = "usage") => ({
    description: "mock: usage",
    model: "mock",
    tokenType,
    quantity: 1n,
    amountNanos,
    discountRuleId: tokenType === "discount" ? "disc_1" : null,
  });
  const page = renderInvoiceHtml({
    ...invoice,
    lines: [line(1_234_567_000_000_000n), line(12_345_678_901n), line(1_500n), line(-1_000_000_000n, "discount")],
    subtotalCents: 123_456_701_235n,
  });
  const amounts = [...page.matchAll(/<td class="num">([^<]*)<\/td><\/tr>/g)].map((m) => m[1]);
  expect(amounts.slice(0, 4)).toEqual(["$1,234,567.00", "$12.345678901", "$0.0000015", "-$1.00"]);
  expect(page).toContain("<td>Subtotal</td><td class=\"num\">$1,234,567,012.35</td>");
});

test("only an issued invoice asks for payment: drafts and void invoices say so, paid ones say paid", () => {
  const total = (status: Invoice["status"]) => renderInvoiceHtml({ ...invoice, status });
  expect(total("issued")).toContain("<td>Total due</td><td class=\"num\">$3.31</td>");
  for (const status of ["draft", "paid", "void"] as const) expect(total(status)).not.toContain("Total due");
  expect(total("void")).toContain('<tr class="notice"><td colspan="2">VOID – nothing is due</td></tr>');
  expect(total("draft")).toContain('<tr class="notice"><td colspan="2">DRAFT – not payable yet</td></tr>');
  expect(total("paid")).toContain("<td>Paid</td><td class=\"num\">$3.31</td>");
  expect(total("issued")).not.toContain('class="notice"');
});
