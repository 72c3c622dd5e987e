import escapeHtml from "escape-html";
import { formatCents, formatNanosAmount } from "../../lib/money.ts";
import type { Invoice, InvoiceStatus } from "../store/types.ts";
import { roundingRule } from "./build.ts";

/** Markup that is already escaped; everything else interpolated into `html` is escaped. */
class SafeHtml {
  constructor(readonly value: string) {}
}

type HtmlValue = SafeHtml | string | number | bigint | readonly HtmlValue[];

/** A template whose every interpolated value is escaped by escape-html, except nested `html` fragments. */
function html(strings: TemplateStringsArray, ...values: HtmlValue[]): SafeHtml {
  const render = (value: HtmlValue): string => {
    if (value instanceof SafeHtml) return value.value;
    if (Array.isArray(value)) return value.map(render).join("");
    return escapeHtml(String(value));
  };
  let out = strings[0] ?? "";
  values.forEach((value, i) => {
    out += render(value) + (strings[i + 1] ?? "");
  });
  return new SafeHtml(out);
}

const day = (at: Date) => at.toISOString().slice(0, 10);
const quantity = (n: bigint) => n.toLocaleString("en-US");

// Label of the total and a notice under it: only an issued invoice asks for payment.
const totalRows: Record<InvoiceStatus, [label: string, notice: string]> = {
  draft: ["Total", "DRAFT – not payable yet"],
  issued: ["Total due", ""],
  paid: ["Paid", ""],
  void: ["Total", "VOID – nothing is due"],
};

/** A printable, self-contained HTML page of one invoice, billed to the org name the invoice holds. */
export function renderInvoiceHtml(invoice: Invoice): string {
  // The period ends at the start of its last day's successor; people read the last day itself.
  const lastDay = new Date(invoice.periodEnd.getTime() - 86_400_000);
  const taxPercent = `${invoice.taxRateBps / 100}%`;
  const [totalLabel, notice] = totalRows[invoice.status];
  const rows = invoice.lines.map((line) => {
    const discount = line.tokenType === "discount";
    return html`    <tr class="${discount ? "discount" : "usage"}"><td>${line.description}</td>\
<td class="num">${discount ? "" : quantity(line.quantity)}</td><td class="num">${formatNanosAmount(line.amountNanos)}</td></tr>\n`;
  });
  // A draft has no number until it is issued.
  const title = invoice.number ? `Invoice ${invoice.number}` : "Draft invoice";
  const page = html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title}: ${invoice.orgName}</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a; margin: 0; }
  main { max-width: 820px; margin: 2rem auto; padding: 0 1.5rem; }
  header { display: flex; flex-wrap: wrap; justify-content: space-between; align-items: flex-start; gap: 1rem 2rem; }
  header > div { flex: none; }
  h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
  .muted { color: #5f6368; }
  .status { display: inline-block; padding: .1rem .6rem; border: 1px solid currentColor; border-radius: 1rem;
    font-size: .8rem; text-transform: uppercase; letter-spacing: .05em; }
  .status-draft, .status-void { color: #b3261e; }
  .status-issued { color: #0b57d0; }
  .status-paid { color: #146c2e; }
  dl { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; margin: 0; }
  dt { color: #5f6368; }
  dd { margin: 0; }
  /* A long name without spaces (org, model, rule) wraps rather than pushing the amounts off the page. */
  dd, td { overflow-wrap: anywhere; }
  table { width: 100%; border-collapse: collapse; margin-top: 2rem; }
  th, td { padding: .45rem .5rem; border-bottom: 1px solid #e0e0e0; text-align: left; vertical-align: top; }
  th { font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; color: #5f6368; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  tr.discount td { color: #146c2e; }
  table.totals { width: auto; margin-left: auto; min-width: 18rem; }
  table.totals td { border: none; padding: .2rem .5rem; }
  table.totals tr.total td { border-top: 2px solid #1a1a1a; font-weight: 600; font-size: 1.05rem; }
  table.totals tr.notice td { color: #b3261e; font-weight: 600; text-align: right; }
  footer { margin-top: 2rem; font-size: .8rem; color: #5f6368; }
  @media print {
    main { margin: 0; max-width: none; }
    .status { border-width: 2px; }
    /* A page break never parts the total from the subtotal, tax or notice above and below it, nor splits a line. */
    table.totals, tr, footer p { break-inside: avoid; }
  }
</style>
</head>
<body>
<main>
<header>
  <div>
    <h1>${title}</h1>
    <span class="status status-${invoice.status}">${invoice.status}</span>
  </div>
  <dl>
    <dt>Billed to</dt><dd>${invoice.orgName}</dd>
    <dt>Account</dt><dd>${invoice.orgId}</dd>
    <dt>Period</dt><dd>${day(invoice.periodStart)} to ${day(lastDay)}</dd>
    <dt>Issued</dt><dd>${invoice.issuedAt ? day(invoice.issuedAt) : "not yet issued"}</dd>
    <dt>Invoice id</dt><dd>${invoice.id}</dd>
  </dl>
</header>
<table class="lines">
  <thead><tr><th>Description</th><th class="num">Quantity</th><th class="num">Amount (USD)</th></tr></thead>
  <tbody>
${invoice.lines.length === 0 ? html`    <tr><td colspan="3" class="muted">No usage in this period.</td></tr>\n` : rows}  </tbody>
</table>
<table class="totals">
  <tr><td>Subtotal</td><td class="num">${formatCents(invoice.subtotalCents)}</td></tr>
  <tr><td>Discounts</td><td class="num">${formatCents(-invoice.discountCents)}</td></tr>
  <tr><td>Tax (${taxPercent})</td><td class="num">${formatCents(invoice.taxCents)}</td></tr>
  <tr class="total"><td>${totalLabel}</td><td class="num">${formatCents(invoice.totalCents)}</td></tr>
${notice ? html`  <tr class="notice"><td colspan="2">${notice}</td></tr>\n` : ""}</table>
<footer>
  <p>Rounding: ${roundingRule}</p>
  <p>Quantities are tokens. Line amounts are exact and unrounded.</p>
</footer>
</main>
</body>
</html>
`;
  return page.value;
}
